"""Ed25519 signing keys: private halves in a directory (mode 0600), public halves in the ledger."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import AlreadyExists, InvalidInput, KeyError_
from .tokens import b64d, b64e

_KID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_kid(kid: str) -> str:
    if not _KID.match(kid or ""):
        raise InvalidInput(f"invalid key id {kid!r} (letters, digits, . _ -; at most 64)")
    return kid


def private_path(keys_dir: Path, kid: str) -> Path:
    return keys_dir / f"{check_kid(kid)}.key"


def generate(keys_dir: Path, kid: str) -> Ed25519PrivateKey:
    """Create ``<kid>.key`` (PKCS#8 PEM, mode 0600); refuses to overwrite an existing file."""
    path = private_path(keys_dir, kid)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"key file {path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def load_private(keys_dir: Path, kid: str) -> Ed25519PrivateKey:
    path = private_path(keys_dir, kid)
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyError_(f"no private key for {kid} in {keys_dir} (mint on the key's host)") from None
    except PermissionError:
        raise KeyError_(f"cannot read {path}: permission denied") from None
    if st.st_mode & 0o077:
        raise KeyError_(f"{path} is accessible by others (mode {st.st_mode & 0o777:04o}); chmod 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyError_(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path} is not an Ed25519 key (only Ed25519 is accepted)")
    return key


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64e(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_from_text(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(b64d(text))

"""MUNGE credentials (libmunge through ctypes): how a compute node proves itself to the daemon.

Every Slurm cluster already runs munged with one shared key; a credential it encodes says
which uid on which host (IPv4 address) made it, carries a payload, expires (default 300 s)
and is refused if decoded twice. A node's epilog signs the SHA-256 of its request with one,
so the daemon's node listener (``nodedoor``) knows the request came from root on a host of
this cluster, unchanged and not replayed — without any password on the node.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import socket
import threading
from dataclasses import dataclass

from ..errors import LedgerError

_OPT_ADDR4 = 5
_OPT_SOCKET = 8
_lib = None
_lock = threading.Lock()


class MungeError(LedgerError):
    """A credential could not be made or was refused (expired, replayed, forged, no munged)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Credential:
    uid: int
    gid: int
    addr: str  # IPv4 address of the host that encoded it
    payload: bytes


def _load():
    global _lib
    with _lock:
        if _lib is None:
            name = ctypes.util.find_library("munge") or "libmunge.so.2"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as exc:
                raise MungeError(-1, f"libmunge is not installed ({exc})") from None
            lib.munge_encode.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int]
            lib.munge_encode.restype = ctypes.c_int
            lib.munge_decode.argtypes = [ctypes.c_char_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_void_p),
                                         ctypes.POINTER(ctypes.c_int),
                                         ctypes.POINTER(ctypes.c_uint32),
                                         ctypes.POINTER(ctypes.c_uint32)]
            lib.munge_decode.restype = ctypes.c_int
            lib.munge_strerror.argtypes = [ctypes.c_int]
            lib.munge_strerror.restype = ctypes.c_char_p
            lib.munge_ctx_create.restype = ctypes.c_void_p
            lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
            lib.munge_ctx_get.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            lib.munge_ctx_get.restype = ctypes.c_int
            lib.munge_ctx_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
            lib.munge_ctx_set.restype = ctypes.c_int
            _lib = lib
        return _lib


_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


def _error(lib, rc: int) -> MungeError:
    text = lib.munge_strerror(rc)
    return MungeError(rc, f"munge: {text.decode(errors='replace') if text else rc}")


def _ctx(lib, socket_path: str | None):
    ctx = lib.munge_ctx_create()
    if not ctx:
        raise MungeError(-1, "munge: out of memory")
    if socket_path:
        rc = lib.munge_ctx_set(ctx, _OPT_SOCKET, socket_path.encode())
        if rc:
            lib.munge_ctx_destroy(ctx)
            raise _error(lib, rc)
    return ctx


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encode(payload: bytes, socket_path: str | None = None) -> str:
    """A credential over ``payload`` from this host's munged."""
    lib = _load()
    ctx = _ctx(lib, socket_path)
    out = ctypes.c_char_p()
    try:
        rc = lib.munge_encode(ctypes.byref(out), ctx, payload, len(payload))
        if rc:
            raise _error(lib, rc)
        try:
            return out.value.decode("ascii")
        finally:
            _libc.free(out)
    finally:
        lib.munge_ctx_destroy(ctx)


def decode(cred: str, socket_path: str | None = None) -> Credential:
    """Check a credential with this host's munged: who made it, where, over what."""
    if not cred or len(cred) > 4096 or not cred.isascii():
        raise MungeError(-1, "munge: not a credential")
    lib = _load()
    ctx = _ctx(lib, socket_path)
    buf, length = ctypes.c_void_p(), ctypes.c_int()
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    try:
        rc = lib.munge_decode(cred.encode("ascii"), ctx, ctypes.byref(buf), ctypes.byref(length),
                              ctypes.byref(uid), ctypes.byref(gid))
        try:
            payload = ctypes.string_at(buf, length.value) if buf.value else b""
        finally:
            if buf.value:
                _libc.free(buf)
        if rc:
            raise _error(lib, rc)
        addr = ctypes.c_uint32()
        lib.munge_ctx_get(ctx, _OPT_ADDR4, ctypes.byref(addr))
        return Credential(uid.value, gid.value,
                          socket.inet_ntoa(addr.value.to_bytes(4, "little")), payload)
    finally:
        lib.munge_ctx_destroy(ctx)

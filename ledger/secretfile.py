"""Private files that hold a token: the one rule for reading them, and writing them safely.

Reading (:func:`read_secret_file`) is the SPANK plugin's rule (``read_token_file`` in
slurm_plugin/spank/gpuledger_spank.c), word for word, so ``gpuledger quote --token=@FILE``
refuses what ``sbatch --gpu-token=@FILE`` refuses: a regular file, owned by you or by root,
with no access for group or others (``chmod 600``), at most 64 KiB.
tests/test_secret_file.py runs both on the same files.

Writing (:class:`SecretWriter`) never loses a token: the new file is written beside the
target (O_EXCL, mode 0600) and linked into place only when complete, so a reader never sees
half a token; an existing file is refused, or with ``force`` first kept as ``FILE.~N~``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InvalidInput

MAX_BYTES = 65536  # GL_MAX_FILE in the SPANK plugin


def read_secret_file(path: str | os.PathLike, what: str = "token file") -> str:
    """The text of a private token file; InvalidInput (the plugin's words) when the file
    breaks the rule."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        problem = file_problem(path, st)
        if problem:
            raise InvalidInput(problem)
        data = b""
        while len(data) < MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} does not hold a token (not text)") from None


def file_problem(path: str, st: os.stat_result, uid: int | None = None) -> str | None:
    """What is wrong with a token file of this stat, in the plugin's words; None if fine."""
    uid = os.getuid() if uid is None else uid
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})"
    if mode & 0o077:
        who = ("readable by others" if mode & 0o004 else "readable by group" if mode & 0o040
               else "accessible by group or others")
        return f"{path} is {who} (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
    if st.st_size > MAX_BYTES:
        return f"{path} is too large ({st.st_size} bytes) to hold a token"
    return None


class SecretWriter:
    """A token file written in two steps around the ledger operation that makes the token:
    :meth:`prepare` (before: the directory is writable and the name is free, or ``force``),
    :meth:`write` (inside the operation's transaction: a failure undoes the operation) and
    :meth:`undo` (the operation failed after :meth:`write`: nothing is left behind).

    ``write`` puts the token in a temporary file beside the target (O_EXCL, 0600), fsyncs
    it, then links it to the target (``link`` fails if the name was taken meanwhile, so
    nothing is ever overwritten) — or with ``force``, keeps the old file as ``FILE.~N~``
    first and then renames over it."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False):
        self.path = Path(path)
        self.force = force
        self.backup: Path | None = None
        self._tmp: Path | None = None
        self._done = False

    def prepare(self) -> None:
        """Refuse early, before any token exists: a taken name, a directory that cannot
        be written."""
        if self.path.is_dir():
            raise InvalidInput(f"{self.path} is a directory; name a file for the token")
        if (self.path.exists() or self.path.is_symlink()) and not self.force:
            raise InvalidInput(f"{self.path} exists; refusing to overwrite a token file "
                               "(pass --force to keep the old one as FILE.~N~ and write it)")
        if self._tmp is None:
            self._tmp = self._create_tmp()

    def _create_tmp(self) -> Path:
        for n in range(100):
            tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{n}.tmp"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600))
                return tmp
            except FileExistsError:
                continue
            except OSError as exc:
                raise InvalidInput(f"cannot write {self.path}: {exc.strerror}") from None
        raise InvalidInput(f"cannot write {self.path}: no free temporary name")

    def write(self, token: str) -> None:
        """Put ``token`` in place (called inside the issuing transaction; a second call —
        the transaction run again — replaces what the first wrote)."""
        if self._done:
            self.undo()
        self.prepare()
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "w") as fh:
                fh.write(token + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(self._tmp, 0o600)
            if self.force and (self.path.exists() or self.path.is_symlink()):
                self.backup = self._keep_old()
                os.replace(self._tmp, self.path)
            else:
                os.link(self._tmp, self.path)
                os.unlink(self._tmp)
        except FileExistsError:
            self.undo()
            raise InvalidInput(f"{self.path} appeared meanwhile; refusing to overwrite a "
                               "token file (nothing was issued)") from None
        except OSError as exc:
            self.undo()
            raise InvalidInput(f"cannot write {self.path}: {exc.strerror} (nothing was "
                               "issued)") from None
        self._tmp = None
        self._done = True
        _fsync_dir(self.path.parent)

    def _keep_old(self) -> Path:
        for n in range(1, 1000):
            backup = self.path.with_name(f"{self.path.name}.~{n}~")
            try:
                os.link(self.path, backup, follow_symlinks=False)
                return backup
            except FileExistsError:
                continue
        raise InvalidInput(f"cannot keep the old {self.path}: 999 backups exist")

    def undo(self) -> None:
        """Remove what :meth:`prepare`/:meth:`write` left (the token was not issued)."""
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if self._done:
            if self.backup is not None:
                os.replace(self.backup, self.path)  # the old token file, back in place
                self.backup = None
            else:
                self.path.unlink(missing_ok=True)
            self._done = False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

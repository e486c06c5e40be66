"""The one way root (or SlurmUser) writes files on a node: checked directories, no symlinks.

Every file the hooks and the agent write — the prolog's run records and their temp files,
the hooks log, the agent's spool — goes through :class:`SafeDir`. A directory is opened
component by component from ``/`` with ``O_DIRECTORY|O_NOFOLLOW`` (after resolving the
parents of the configured path once, so a site's ``/var/run -> /run`` still works; the
directory itself must not be a symlink) and checked on the
open descriptor:

- the directory itself: owned by root or by the running uid, and writable by nobody else
  (no group/other write bit);
- every directory above it: owned by root or by the running uid, and not writable by others
  unless sticky (``/tmp``). A group-writable parent is allowed (Ubuntu's ``/var/log`` is
  ``root:syslog 0775``): the checks below its child still hold.

Files are then opened relative to that descriptor (``dir_fd=``) with ``O_NOFOLLOW``: a new
file is written to a fresh ``O_CREAT|O_EXCL`` temp file and renamed over the target within
the directory; an appended file (a log) must be a regular file with one link. A
directory that fails is refused with :class:`UnsafePath` (an ``OSError``): the caller logs
one line and goes on without it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Self

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_READ = 1 << 20  # a record or spool file larger than this is not ours


class UnsafePath(OSError):
    """A directory or file root must not write through."""


def _trusted_uids() -> set[int]:
    return {0, os.geteuid()}


def _check(st: os.stat_result, where: str, *, last: bool) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{where} is not a directory")
    if st.st_uid not in _trusted_uids():
        raise UnsafePath(f"{where} is owned by uid {st.st_uid}, not root or uid "
                         f"{os.geteuid()}")
    mode = stat.S_IMODE(st.st_mode)
    if last and mode & 0o022:
        raise UnsafePath(f"{where} is writable by group or others (mode {mode:04o})")
    if not last and mode & 0o002 and not mode & stat.S_ISVTX:
        raise UnsafePath(f"{where} is writable by others (mode {mode:04o})")


def _name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


class SafeDir:
    """An open, checked directory; use as a context manager (closes its descriptor)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False,
                 mode: int = 0o700) -> None:
        self.path = Path(os.path.abspath(path))
        self.fd = self._open(create, mode)

    # -- opening ------------------------------------------------------------------------
    def _open(self, create: bool, mode: int) -> int:
        # the parents as the site laid them out (symlinks resolved once); the directory itself
        # and every step down to it opened without following a symlink
        target = Path(os.path.realpath(self.path.parent)) / self.path.name
        parts = target.parts[1:]
        fd = os.open("/", _DIR_FLAGS)
        try:
            _check(os.fstat(fd), "/", last=not parts)
            here = Path("/")
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                here = here / part
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, mode if last else 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or a file
                        raise UnsafePath(f"{here} is not a directory (or was swapped for "
                                         "a symlink)") from None
                    raise
                os.close(fd)
                fd = nfd
                _check(os.fstat(fd), str(here), last=last)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------
    def write_atomic(self, name: str, data: bytes, *, mode: int = 0o600,
                     fsync: bool = True) -> Path:
        """Write ``name`` whole: a fresh temp file (O_EXCL, O_NOFOLLOW), then a rename."""
        name = _name(name)
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=self.fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise
        if fsync:
            os.fsync(self.fd)
        return self.path / name

    def open_append(self, name: str, *, mode: int = 0o640) -> int:
        """A descriptor appending to ``name`` (created if missing): a regular file with one
        link, never a symlink."""
        try:
            fd = os.open(_name(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO nobody reads
                raise UnsafePath(f"{self.path / name} is a symlink or not a plain file") from None
            raise
        try:
            st = os.fstat(fd)
            # its owner may differ (the controller's hooks.log is the SlurmUser's): in a
            # directory nobody else can write to, a plain file with one link is only itself
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise UnsafePath(f"{self.path / name} is not a plain file (or has other links)")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlink(self, name: str) -> bool:
        try:
            os.unlink(_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    # -- reading ------------------------------------------------------------------------
    def read(self, name: str, limit: int = MAX_READ) -> bytes | None:
        """The bytes of ``name`` (None when missing); a symlink, a non-file or a file over
        ``limit`` bytes raises."""
        try:
            fd = os.open(_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{self.path / name} is a symlink") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{self.path / name} is not a plain file")
            if st.st_size > limit:
                raise UnsafePath(f"{self.path / name} is larger than {limit} bytes")
            chunks = []
            left = limit + 1
            while left > 0:
                chunk = os.read(fd, min(left, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            if len(data) > limit:
                raise UnsafePath(f"{self.path / name} is larger than {limit} bytes")
            return data
        finally:
            os.close(fd)

    def names(self) -> Iterator[str]:
        return iter(sorted(os.listdir(self.fd)))

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(_name(name), dir_fd=self.fd, follow_symlinks=False)


def write_atomic(dirpath: str | os.PathLike[str], name: str, data: bytes, *,
                 mode: int = 0o600, create: bool = True, dir_mode: int = 0o700,
                 fsync: bool = True) -> Path:
    """``SafeDir(dirpath).write_atomic(name, data)`` in one call."""
    with SafeDir(dirpath, create=create, mode=dir_mode) as d:
        return d.write_atomic(name, data, mode=mode, fsync=fsync)


def open_append(path: str | os.PathLike[str], *, mode: int = 0o640, create: bool = True,
                dir_mode: int = 0o755) -> int:
    """A descriptor appending to the file ``path`` in a checked directory."""
    p = Path(path)
    with SafeDir(p.parent, create=create, mode=dir_mode) as d:
        return d.open_append(p.name, mode=mode)

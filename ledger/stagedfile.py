"""A file replaced atomically, staged before the ledger records that it was written.

``gpuledger verify --export-head FILE`` journals the export of a signed head: the file must
be known to be writable, and its text written, before that row exists — else a head that
never reached the file is on record and the next ``verify --against`` of the file there
reports a replayed head. :class:`StagedFile` creates its temporary file beside the target
first (:meth:`open`: an unwritable place fails here, before anything is recorded), takes
the text (:meth:`write`, fsynced), and moves it into place last (:meth:`commit`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidInput


class StagedFile:
    def __init__(self, path: str | os.PathLike, mode: int = 0o644):
        self.path = Path(path)
        self.mode = mode
        self._tmp: Path | None = None

    def open(self) -> StagedFile:
        if self.path.is_dir():
            raise InvalidInput(f"cannot write {self.path}: it is a directory")
        for n in range(100):
            tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{n}.tmp"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 self.mode))
            except FileExistsError:
                continue
            except OSError as exc:
                raise InvalidInput(f"cannot write {self.path}: {exc.strerror}") from None
            self._tmp = tmp
            return self
        raise InvalidInput(f"cannot write {self.path}: no free temporary name")

    def write(self, text: str) -> None:
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(self._tmp, self.mode)
        except OSError as exc:
            raise InvalidInput(f"cannot write {self.path}: {exc.strerror}") from None

    def commit(self) -> None:
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise InvalidInput(f"cannot move {self._tmp} to {self.path}: {exc.strerror}") \
                from None
        self._tmp = None

    def discard(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

"""The SQLite file a registry writes: held by one registry at a time, and the same file
throughout.

A SQLite database has one server. :class:`DatabaseFile` holds an advisory lock (``flock``) on
a sidecar file beside the database, ``<database>.lock``, from start to close; a second
registry (another server, or a program using the library, in this process or another) finds
it held and is refused with :class:`~registry.errors.DatabaseInUseError` naming the holder,
whose description is the one line the lock file holds. The kernel releases the lock when its
process ends, however it ends (``kill -9`` included), so a crashed registry never locks out
the next one; the lock file itself stays (removing it would let a registry that opened it a
moment earlier lock a file no longer on disk while a third locks a new one). Readers (the
history API and the command line's read commands) take no lock: they work beside a server.

It also remembers which file it opened (device and inode): :meth:`DatabaseFile.check`, run
by the writer before each commit, fails when the path no longer names that file. A database
deleted or replaced under a running registry would otherwise take commits that vanish with
the unlinked file, acknowledged as durable.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy.engine import URL

from registry.errors import DatabaseInUseError, StoreUnavailableError, describe

LOCK_SUFFIX = ".lock"
#: Longest holder line read back from a lock file.
_HOLDER_BYTES = 1024


def database_path(url: URL) -> Path | None:
    """The file a SQLite URL names (symbolic links resolved, relative to the working
    directory as SQLite resolves it; a ``file:`` URI filename too), or None for an in-memory
    database or another dialect."""
    database = url.database
    if url.get_backend_name() != "sqlite" or database in (None, "", ":memory:"):
        return None
    if database.startswith("file:"):
        database = unquote(urlsplit(database).path)
        if url.query.get("mode") == "memory" or database in ("", ":memory:"):
            return None
    return Path(os.path.realpath(database))


class DatabaseFile:
    """The lock on, and the identity of, one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + LOCK_SUFFIX)
        self._lock_fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def _try_lock(self, fd: int) -> None:
        """Lock ``fd`` or raise :class:`DatabaseInUseError` naming the holder."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip()
            raise DatabaseInUseError(str(self.path), holder or None) from None

    def acquire(self, holder: str) -> None:
        """Lock the database for this registry, describing it as ``holder`` (one line).

        Raises :class:`DatabaseInUseError` if another registry holds it, and
        :class:`OSError` if the lock file cannot be opened (as the database could not).
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._try_lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the lock, if it was taken
            raise
        self._lock_fd = fd

    def ensure_free(self) -> None:
        """Raise :class:`DatabaseInUseError` if another registry holds the database now.

        A check ahead of a start that gives a clear answer early (and creates nothing);
        :meth:`acquire` decides.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # never locked here
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot open the lock file {self.lock_path}: {describe(exc)}"
            ) from exc
        try:
            self._try_lock(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (clearing the holder line); a no-op when not held."""
        fd, self._lock_fd = self._lock_fd, None
        self._identity = None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # the lock goes with the descriptor regardless
            os.ftruncate(fd, 0)
        os.close(fd)

    def remember(self) -> None:
        """Note which file the path names now: the one the registry has opened."""
        status = os.stat(self.path)
        self._identity = (status.st_dev, status.st_ino)

    def check(self) -> None:
        """Raise :class:`StoreUnavailableError` if the path no longer names the remembered
        file (deleted, or replaced by another): what is committed now would not be kept."""
        if self._identity is None:
            return
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            raise StoreUnavailableError(
                f"the database file {self.path} has been deleted since the registry opened "
                "it: nothing written now would be kept"
            ) from None
        if (status.st_dev, status.st_ino) != self._identity:
            raise StoreUnavailableError(
                f"the database file {self.path} has been replaced by another file since the "
                "registry opened it: nothing written now would be kept"
            )

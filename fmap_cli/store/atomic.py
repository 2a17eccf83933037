"""Atomic output, for every file fmap writes: build it under a hidden, locked temporary name beside
the output, make it durable, then publish it under the final name in one step.

A file at the output path is therefore always finished. Without ``overwrite`` the publish step
never replaces a file: an output that appeared while this run was writing (another run with the
same ``-o``) is an error, not a silent loss of one of the results. The temporary file is locked
(``flock``) while a run writes it, so ``--resume`` can tell a live run's file from a killed one's.
Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ..errors import FmapError, UsageError

PARTIAL = "partial"
NAME_BYTES = 200  # of OUT's name kept in the temporary name, so it fits the usual 255-byte limit


def temporary_path(out: Path) -> Path:
    """A new hidden name beside ``out``: process id and a random part, so a run never writes over
    the file of another (or of the run it resumes)."""
    return out.with_name(f".{_short(out)}.{os.getpid()}-{secrets.token_hex(3)}.{PARTIAL}")


def _short(out: Path) -> str:
    """OUT's name cut to NAME_BYTES bytes (not characters: file name limits count bytes)."""
    return os.fsdecode(os.fsencode(out.name)[:NAME_BYTES])


def _temporary_name(out: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{_short(out)}.") + r"(\d+)-[0-9a-f]{6}\." + PARTIAL)


def partial_files(out: Path) -> list[Path]:
    """Temporary files of runs writing ``out`` (exactly the names :func:`temporary_path` makes),
    newest first."""
    pattern = _temporary_name(out)
    try:
        found = [path for path in out.parent.iterdir() if pattern.fullmatch(path.name)]
    except OSError:
        return []
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile: sorts last
        return 0.0


def writer_pid(path: Path) -> int | None:
    """The process id written into a temporary name, or None."""
    match = re.search(r"\.(\d+)-[0-9a-f]{6}\." + PARTIAL + "$", path.name)
    return int(match.group(1)) if match else None


def in_use(path: Path) -> bool:
    """True when a running fmap holds ``path``'s lock (it is writing that file now)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: nothing can be told
        return False
    finally:
        os.close(fd)
    return False


def check_target(out: Path, overwrite: bool, inputs: Sequence[str | Path] = (), flag: str = "-o") -> None:
    """Refuse an output path that cannot be published safely.

    Raises:
        UsageError: ``out`` exists (without ``overwrite``), exists but is not a regular file (a
            device, FIFO, directory: never replaced), sits in a missing or read-only directory, or
            is one of ``inputs``.
    """
    kind = _kind(out)
    if kind == "a directory":
        raise UsageError(f"{flag} {out}: is a directory; give a file name")
    if kind is not None and kind != "a regular file":
        raise UsageError(f"{flag} {out}: exists and is not a regular file ({kind}); give a file name")
    if kind is not None and not overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: directory {parent} is not writable")
    target = out.resolve()
    for path in inputs:
        if Path(path).resolve() == target:
            raise UsageError(f"{flag} {out}: is also an input; choose another output name")


def _kind(path: Path) -> str | None:
    """What ``path`` is (following symlinks), in words; None when nothing is there."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a dangling symlink" if path.is_symlink() else None
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    for test, words in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return words
    return "not a regular file"


def busy(path: Path) -> FmapError:
    """The error for a file another fmap run holds (names the process when its name tells)."""
    pid = writer_pid(path)
    by = f" (process {pid})" if pid else ""
    return FmapError(f"{path}: in use by another fmap run{by}; wait for it to finish")


def lock(path: Path) -> int:
    """Take the exclusive lock of an existing file ``path``; returns the descriptor holding it.

    Raises:
        FmapError: another process holds it (names the process when the name tells).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy(path) from None
    except OSError:  # no locks on this file system: go on unlocked
        pass
    try:
        replaced = os.fstat(fd).st_ino != path.stat().st_ino
    except OSError:
        replaced = True
    if replaced:  # another run published a new file there while this one waited for the old one
        os.close(fd)
        raise busy(path)
    return fd


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicOutput:
    """A hidden, locked temporary file that becomes ``out`` only through :meth:`publish`.

    Leaving the ``with`` block without publishing removes the temporary file, unless
    :meth:`keep` was called (an interrupted run keeps it for ``--resume``).

    >>> with AtomicOutput(Path("maps.h5")) as tmp:
    ...     write_everything(tmp.path)
    ...     tmp.publish()
    """

    def __init__(self, out: Path, overwrite: bool = False) -> None:
        self.out = out
        self.overwrite = overwrite
        self.path = temporary_path(out)
        self._fd: int | None = None
        self._keep = False

    def __enter__(self) -> AtomicOutput:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise FmapError(f"{self.out}: cannot write output file ({self.path.name}): {exc.strerror}") from None
        with contextlib.suppress(OSError):  # a file system without locks still gets atomic output
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self

    def keep(self) -> None:
        """Leave the temporary file in place when the block ends unpublished."""
        self._keep = True

    @property
    def kept(self) -> bool:
        """The temporary file stays when the block ends unpublished."""
        return self._keep

    def publish(self) -> None:
        """fsync the finished file, give it its final name, fsync the directory.

        Raises:
            FmapError: ``out`` appeared meanwhile (without ``overwrite``; the finished file is kept
                under its temporary name, which the message gives), or the file system refused.
        """
        assert self._fd is not None, "publish() outside 'with'"
        try:
            os.fsync(self._fd)
            if self.overwrite:
                self.path.replace(self.out)
            else:
                self._publish_new()
        except FileExistsError:
            self._keep = True
            raise FmapError(
                f"{self.out}: appeared while this run was writing (another run with the same output?); "
                f"not replaced: this run's file is kept as {self.path}"
            ) from None
        except OSError as exc:
            raise FmapError(f"{self.out}: cannot move the finished file into place: {exc.strerror or exc}") from None
        self._close()
        fsync_dir(self.out.parent)

    def _publish_new(self) -> None:
        """Give the file its final name only if that name is free (a hard link fails if it is taken)."""
        try:
            os.link(self.path, self.out)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # no hard links here (e.g. FAT, some network file systems): check, then rename
            if os.path.lexists(self.out):
                raise FileExistsError(errno.EEXIST, "exists") from None
            self.path.replace(self.out)
            return
        self.path.unlink()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        published = self._fd is None
        self._close()
        if not published and not self._keep:
            with contextlib.suppress(OSError):  # never mask the error that ended the block
                self.path.unlink()

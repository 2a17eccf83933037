"""Write an fmap file batch by batch: a new file, built under a locked temporary name and published
atomically (``atomic.py``), optionally seeded with the images of an earlier file (--resume: a killed
run's; --append: OUT's own). The layout comes from ``layout.py``, rows from ``rows.py``. h5py and
numpy only.

An error removes the temporary file; an interruption (signal) keeps it for ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import h5py

from ..errors import FmapError, StoppedError, first_line
from ..stopping import StopRequested, wait
from .atomic import AtomicOutput, lock
from .chunks import UNRECORDED
from .layout import LayerRecord, Storage, create_layout, join_distinct, set_attrs
from .rows import Batch, Failure, RowWriter, stored_stats


@dataclass(frozen=True)
class Seed:
    """A file whose images a new file starts with."""

    path: Path
    # True: a finished file (--append: OUT itself), whose stored statistics are used as they are.
    # False: a killed run's temporary file, whose statistics are counted again from its maps.
    finished: bool


class FileWriter:
    """What every fmap file writer shares: a RowWriter on a new file under a locked temporary name,
    the disk-full guard, and publishing when the ``with`` block succeeds (removing it otherwise).

    Subclasses make the layout (:meth:`_open` with a builder) and add their own ``append``.
    """

    resumable = False  # an interrupted run keeps its temporary file for --resume

    def __init__(self, rows: RowWriter, guard: WriteGuard, output: AtomicOutput, hold: int | None = None) -> None:
        self.rows = rows
        self._guard = guard
        self._output = output
        self._hold = hold  # a descriptor holding a lock released when done (OUT's while appending)

    @staticmethod
    def _open(
        out: Path, overwrite: bool, build: Callable[[h5py.File], RowWriter], hold: int | None = None
    ) -> tuple[RowWriter, WriteGuard, AtomicOutput]:
        """A new file beside ``out`` whose layout ``build`` creates, flushed once: a full disk fails
        here, before any work.

        Raises:
            FmapError: the temporary file cannot be written.
        """
        output = AtomicOutput(out, overwrite).__enter__()
        guard: WriteGuard | None = None
        try:
            f = h5py.File(output.path, "w", locking=False)  # the AtomicOutput lock guards it
            guard = WriteGuard(f)
            rows = build(f)
            f.flush()
            guard.check()
        except BaseException as exc:  # KeyboardInterrupt included: never leave a new temporary file
            if guard is not None:
                guard.close(discard=True)  # the file is removed: nothing it holds matters
            output.__exit__(type(exc), exc, exc.__traceback__)
            if hold is not None:
                os.close(hold)
            if isinstance(exc, OSError | RuntimeError | _WriteFailed):
                raise FmapError(f"cannot write {out}: {_reason(exc)}") from None
            raise
        return rows, guard, output

    def __enter__(self) -> Self:
        return self

    @property
    def out(self) -> Path:
        return self._output.out

    @property
    def n_images(self) -> int:
        """Images in the file now."""
        return self.rows.n_images

    @property
    def path(self) -> Path:
        """The temporary file being written."""
        return self._output.path

    def file(self) -> h5py.File:
        """The open file (for checks that run before it becomes final, e.g. --verify)."""
        return self.rows.f

    def _guarded(self, write: Callable[[], None]) -> None:
        """Run ``write``; a failed write (disk full, file size limit) is one FmapError, and nothing
        more goes to the file (see :class:`WriteGuard`)."""
        try:
            write()
            self._guard.check()
        except (OSError, RuntimeError, _WriteFailed) as exc:  # h5py raises RuntimeError when a flush fails
            self._guard.discard()
            raise FmapError(f"cannot write {self.out}: {_reason(exc)}") from None

    def add_failures(self, failures: Sequence[Failure]) -> None:
        """Record images skipped with --skip-bad: (position in the input list, path, reason)."""
        self._guarded(lambda: self.rows.add_failures(failures))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
            return
        interrupted = isinstance(exc, StoppedError | KeyboardInterrupt)
        if self.resumable and interrupted and self.n_images and self._guard.failure is None:
            self._output.keep()  # an interrupted run keeps its flushed batches for --resume
        self._abandon(exc_type, exc, tb)

    def finish(self) -> None:
        """Mark the file complete, make it durable and publish it as ``out``.

        Raises:
            FmapError: nothing was written, or the file cannot be finished.
        """
        if self.n_images == 0:
            error = FmapError(f"{self.out}: no images were written")
            self._abandon(FmapError, error, None)
            raise error
        f = self.rows.f
        try:
            self.rows.close()
            self.rows.sort_failures()
            set_attrs(f, complete=1)
            f.flush()
            self._guard.check()
            f.close()
            self._output.publish()
        except BaseException as exc:
            self._abandon(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError | RuntimeError | _WriteFailed):
                raise FmapError(f"cannot finish {self.out}: {_reason(exc)}") from None
            raise
        self._release()

    def _abandon(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rows.close()
        self._guard.close(discard=not self._output.kept)  # a file that is removed: nothing more is written
        self._output.__exit__(exc_type, exc, tb)
        self._release()

    def _release(self) -> None:
        self._guard.restore()
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None


class MapWriter(FileWriter):
    """Writes maps batch by batch into a new file and publishes it when the ``with`` block succeeds.

    An --append is a new file too, seeded with OUT's images (copied as stored chunks) and published
    over OUT: OUT stays intact until the appended file is complete, whatever happens meanwhile.

    >>> with MapWriter.create(out, layers, attrs, Storage()) as writer:
    ...     writer.append(batch)
    """

    def __init__(
        self, rows: RowWriter, guard: WriteGuard, output: AtomicOutput, seed: Seed | None, hold: int | None
    ) -> None:
        super().__init__(rows, guard, output, hold)
        self._seed = seed
        self.already = rows.n_images  # images there before this run: seeded
        self.resumable = not self.appending  # an --append that stops leaves OUT as it was, and nothing else

    @classmethod
    def create(
        cls,
        out: Path,
        layers: Sequence[LayerRecord],
        attrs: Mapping[str, Any],
        storage: Storage,
        input_shape: tuple[int, int, int] | None = None,
        overwrite: bool = False,
        seed: Seed | None = None,
    ) -> MapWriter:
        """A new file under a temporary name beside ``out``, starting with ``seed``'s images if given.

        Raises:
            FmapError: the temporary file cannot be written, or (appending) another run holds ``out``.
        """
        hold = lock(out) if seed is not None and seed.finished else None  # one append at a time

        def build(f: h5py.File) -> RowWriter:
            rows = RowWriter(f, layers, storage, keep=create_layout(f, layers, attrs, input_shape, storage))
            if seed is not None:
                f.flush()  # a full disk fails before the copy
                with h5py.File(seed.path, "r", locking=False) as old:  # locked by us, or a killed run's
                    rows.seed_from(old, stored_stats(old, layers) if seed.finished else None)
                    # the seeded chunks keep the bytes their own writer made (ISA-L or the zlib fallback)
                    before = str(old.attrs.get("compressor", UNRECORDED))
                    set_attrs(f, compressor=join_distinct([before, str(f.attrs["compressor"])]))
            return rows

        return cls(*cls._open(out, overwrite, build, hold), seed, hold)

    @property
    def layers(self) -> list[LayerRecord]:
        return self.rows.layers

    @property
    def appending(self) -> bool:
        """Seeded with OUT's own images (--append)."""
        return self._seed is not None and self._seed.finished

    def append(self, batch: Batch) -> None:
        """Append one batch (see :meth:`RowWriter.append`).

        Raises:
            FmapError: the disk is full, a file size limit was reached, or another write error.
        """
        self._guarded(lambda: self.rows.append(batch))


class _WriteFailed(Exception):  # noqa: N818 - carries HDF5's own error
    """A write HDF5 could only report as "unraisable" (see :class:`WriteGuard`)."""


class WriteGuard:
    """Turns a failed write (disk full, file size limit) into one clean error.

    h5py reports a write that fails while a dataset object is freed as "unraisable" (printed, not
    raised), and HDF5 then fails again on every later write, the ones at exit included, which
    crashed the process (exit 139). The guard records the first such failure and points HDF5's
    descriptor at /dev/null at once, so the library stays consistent and closes cleanly; the next
    :meth:`check` raises, and the file is removed.
    """

    def __init__(self, f: h5py.File) -> None:
        self.f = f
        self.fd = f.id.get_vfd_handle()  # asking HDF5 for it after a failure crashed the process
        self.failure: BaseException | None = None
        self._previous = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def _unraisable(self, unraisable: Any) -> None:
        if _WRITE_FAILED.search(str(unraisable.exc_value)) is None:
            self._previous(unraisable)
            return
        if self.failure is None:
            self.failure = unraisable.exc_value
            self.discard()

    def check(self) -> None:
        """Raise the failure an implicit close recorded, if any."""
        if self.failure is not None:
            raise _WriteFailed(str(self.failure))

    def discard(self) -> None:
        """Send every later write of HDF5 to /dev/null."""
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, self.fd)
        finally:
            os.close(null)

    def close(self, discard: bool) -> None:
        """Close the file (``discard``: without writing anything more); never raises for the file."""
        if discard:
            self.discard()
        if self.f.id.valid:
            try:
                self.f.close()
            except (OSError, RuntimeError):
                self.discard()
                with contextlib.suppress(OSError, RuntimeError):
                    self.f.close()
        self.restore()

    def restore(self) -> None:
        """Put back the previous unraisable hook."""
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous


_WRITE_FAILED = re.compile(r"write failed.*?errno = (\d+)", re.DOTALL)


def _reason(exc: BaseException) -> str:
    """A failed write in words: h5py's messages wrap the system's error in a paragraph."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    match = _WRITE_FAILED.search(str(exc))
    return os.strerror(int(match.group(1))) if match else first_line(exc)


WRITE_BEHIND = 2  # batches that may wait for the writer thread


class BackgroundWriter:
    """Feeds a MapWriter from a thread, so writing (compression, statistics) overlaps the next
    forward pass; at most ``depth`` batches wait, so memory stays O(batch).

    >>> with BackgroundWriter(writer) as sink:
    ...     sink.append(batch)  # returns once the batch is queued
    """

    def __init__(
        self, writer: MapWriter, depth: int = WRITE_BEHIND, stop_requested: StopRequested = lambda: None
    ) -> None:
        self.writer = writer
        self._stop_requested = stop_requested  # polled while waiting for room in the queue
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="fmap-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            kind, payload = item
            try:
                if kind == "batch":
                    self.writer.append(payload)
                else:
                    self.writer.add_failures(payload)
            except BaseException as exc:  # handed to the main thread, which raises it
                self._error = exc

    def _put(self, item: tuple[str, Any]) -> None:
        self._raise()
        wait(lambda timeout: self._queue.put(item, timeout=timeout), self._stop_requested)

    def append(self, batch: Batch) -> None:
        """Queue one batch (blocks while ``depth`` batches wait)."""
        self._put(("batch", batch))

    def add_failures(self, failures: Sequence[tuple[int, str, str]]) -> None:
        """Queue failure records (kept in order with the batches)."""
        if failures:
            self._put(("failures", list(failures)))

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        interrupted = isinstance(exc, StoppedError | KeyboardInterrupt)
        if exc_type is not None and not interrupted and self._error is None:
            self._error = StoppedError(0)  # a failed run: nothing more is written; the real error follows
            self._queue.put(None)
            self._thread.join()
            return
        # success, or an interruption: what is queued is finished work, kept for --resume
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()
        self._error = None

"""Write an fmap file batch by batch: a new file (built under a locked temporary name and published
atomically, see ``atomic.py``), one seeded with the images of an earlier file, or an existing file
appended to in place. The layout comes from ``layout.py``, rows from ``rows.py``. h5py and numpy only.

An error removes a new file's temporary file; an interruption (signal) keeps it for ``--resume``.
``--append`` clears ``complete`` until it is done, so an interrupted append is never mistaken for
a finished file.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py

from ..errors import FmapError, StoppedError, first_line
from .atomic import AtomicOutput, lock
from .layout import LayerRecord, Storage, create_layout, set_attrs
from .rows import Batch, Failure, RowWriter, stored_stats

# Root attributes describing one run, kept from the first run when appending.
FIRST_RUN_ATTRS = ("created", "command")


class MapWriter:
    """Writes maps batch by batch and makes the file final when the ``with`` block succeeds.

    Made by :meth:`create` (a new file, optionally seeded) or :meth:`append_to` (in place).

    >>> with MapWriter.create(out, layers, attrs, Storage()) as writer:
    ...     writer.append(batch)
    """

    def __init__(self, out: Path, rows: RowWriter, output: AtomicOutput | None, lock_fd: int | None = None) -> None:
        self.out = out
        self.rows = rows
        self._output = output  # a new file; None when appending in place
        self._lock_fd = lock_fd  # holds OUT's lock while appending in place
        self.already = rows.n_images  # images there before this run: seeded, or in the file appended to

    @classmethod
    def create(
        cls,
        out: Path,
        layers: Sequence[LayerRecord],
        attrs: Mapping[str, Any],
        storage: Storage,
        input_shape: tuple[int, int, int] | None = None,
        overwrite: bool = False,
        seed: Path | None = None,
    ) -> MapWriter:
        """A new file under a temporary name beside ``out``, starting with ``seed``'s images if given.

        Raises:
            FmapError: the temporary file cannot be written.
        """
        output = AtomicOutput(out, overwrite).__enter__()
        f: h5py.File | None = None
        try:
            f = h5py.File(output.path, "w", locking=False)  # the AtomicOutput lock guards it
            create_layout(f, layers, attrs, input_shape, storage)
            rows = RowWriter(f, layers, storage)
            if seed is not None:
                with h5py.File(seed, "r", locking=False) as old:  # a killed run's file: no live writer
                    rows.seed_from(old)
        except BaseException as exc:  # KeyboardInterrupt included: never leave a new temporary file
            if f is not None:
                _close(f)
            output.__exit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError):
                raise FmapError(f"{out}: cannot write output file ({output.path.name}): {_reason(exc)}") from None
            raise
        return cls(out, rows, output)

    @classmethod
    def append_to(
        cls, out: Path, layers: Sequence[LayerRecord], attrs: Mapping[str, Any], storage: Storage
    ) -> MapWriter:
        """``out``, a finished file, opened to add images in place; ``complete`` = 0 until done.

        ``attrs`` must hold the grown input list (``input_list_sha256``, ``n_inputs``,
        ``input_lists``); what the file held before is kept in ``append_base`` meanwhile, so an
        interrupted append can be finished by running it again.

        Raises:
            FmapError: another run holds the file, or it cannot be written.
        """
        fd = lock(out)
        try:
            f = h5py.File(out, "r+", locking=False)  # our lock guards it
        except OSError as exc:
            os.close(fd)
            raise FmapError(f"--append: cannot open {out} for writing: {_reason(exc)}") from None
        try:
            base = {
                "n_inputs": int(f.attrs["n_inputs"]),
                "input_list_sha256": str(f.attrs["input_list_sha256"]),
                "input_lists": json.loads(str(f.attrs.get("input_lists", "[]"))),
            }
            rows = RowWriter(f, layers, storage, int(f.attrs["n_images"]), stored_stats(f, layers))
            set_attrs(f, append_base=base, complete=0)
            set_attrs(f, **{k: v for k, v in attrs.items() if k not in FIRST_RUN_ATTRS})
            f.flush()
        except BaseException:
            _close(f)
            os.close(fd)
            raise
        return cls(out, rows, None, fd)

    def __enter__(self) -> MapWriter:
        return self

    @property
    def n_images(self) -> int:
        """Images in the file now."""
        return self.rows.n_images

    @property
    def layers(self) -> list[LayerRecord]:
        return self.rows.layers

    @property
    def path(self) -> Path:
        """The file being written (temporary name, or OUT when appending)."""
        return self._output.path if self._output is not None else self.out

    @property
    def appending(self) -> bool:
        return self._output is None

    def file(self) -> h5py.File:
        """The open file (for checks that run before it becomes final, e.g. --verify)."""
        return self.rows.f

    def append(self, batch: Batch) -> None:
        """Append one batch (see :meth:`RowWriter.append`).

        Raises:
            FmapError: the disk is full, a file size limit was reached, or another write error.
        """
        try:
            self.rows.append(batch)
        except OSError as exc:
            raise FmapError(f"cannot write {self.out}: {_reason(exc)}") from None

    def add_failures(self, failures: Sequence[Failure]) -> None:
        """Record images skipped with --skip-bad: (position in the input list, path, reason)."""
        try:
            self.rows.add_failures(failures)
        except OSError as exc:
            raise FmapError(f"cannot write {self.out}: {_reason(exc)}") from None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
            return
        if self._output is not None and isinstance(exc, StoppedError | KeyboardInterrupt) and self.n_images:
            self._output.keep()  # an interrupted run keeps its flushed batches for --resume
        self._abandon(exc_type, exc, tb)

    def finish(self) -> None:
        """Mark the file complete, make it durable and, for a new file, publish it as ``out``.

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
            if "append_base" in f.attrs:
                del f.attrs["append_base"]
            set_attrs(f, complete=1)
            f.close()
            if self._output is None:
                with open(self.out, "rb+") as handle:
                    os.fsync(handle.fileno())
            else:
                self._output.publish()
        except BaseException as exc:
            self._abandon(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError):
                raise FmapError(f"cannot finish {self.out}: {_reason(exc)}") from None
            raise
        self._release()

    def _abandon(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rows.close()
        _close(self.rows.f)
        if self._output is not None:
            self._output.__exit__(exc_type, exc, tb)
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _close(f: h5py.File) -> None:
    """Close ``f`` even after a failed write.

    When HDF5 cannot write its metadata (disk full, file size limit), closing fails and leaves the
    file open, and the library's second attempt at exit crashed the process (exit 139). Pointing
    HDF5's descriptor at /dev/null lets the close finish; the file is removed or, when appending,
    stays marked incomplete with every batch flushed before the failure.
    """
    if not f.id.valid:
        return
    try:
        f.close()
    except OSError:
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, f.id.get_vfd_handle())
            os.close(null)
        with contextlib.suppress(OSError):
            f.close()


def _reason(exc: OSError) -> str:
    """An OSError in words: h5py's messages wrap the system's in a paragraph."""
    return os.strerror(exc.errno) if exc.errno else first_line(exc)


WRITE_BEHIND = 2  # batches that may wait for the writer thread


class BackgroundWriter:
    """Feeds a MapWriter from a thread, so writing (compression, statistics) overlaps the next
    forward pass; at most ``depth`` batches wait, so memory stays O(batch).

    >>> with BackgroundWriter(writer) as sink:
    ...     sink.append(batch)  # returns once the batch is queued
    """

    def __init__(self, writer: MapWriter, depth: int = WRITE_BEHIND) -> None:
        self.writer = writer
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
        self._queue.put(item)

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

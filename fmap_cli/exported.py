"""``.pt2`` programs saved with ``torch.export.save``, opened without running code from the file.

``torch.export.load`` (torch 2.13) unpickles with ``weights_only=False`` in several places: weights
and constants marked ``use_pickle``, pickled Python objects among the constants, and the sample
inputs whenever the weights-only unpickler refuses them (a silent fallback). It also loads the
compiled libraries of AOTInductor archives, and, when the current format fails to load, retries
the pre-2.7 format, read with the same fallback. So before torch sees an archive, fmap reads it
with torch's own archive reader and refuses every entry torch would unpickle or run; what is left
is tensors, JSON and one ``weights_only=True`` pickle (the sample inputs). The graph itself can only
call registered operators: torch's verifier refuses any other target while loading.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive import constants as pt2

from .errors import ModelError, first_line

# Ends every refusal: the reason fmap reads .pt2 files this carefully.
NO_CODE = "fmap never runs code from a model file"


def load_program(path: Path) -> tuple[ExportedProgram, bytes]:
    """Read a ``.pt2`` archive, check it, and deserialise it; also return the bytes that were checked.

    Raises:
        ModelError: the file is unreadable, is not a torch.export program, or holds pickled
            objects or compiled code; the message names the file and the entry.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    check_archive(path, data)
    try:  # from the checked bytes, not the path: the file may change in between
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # any failure inside torch's deserializer is the file's
        raise ModelError(f"{path}: not a torch.export program: {type(exc).__name__}: {first_line(exc)}") from None
    return program, data


def check_archive(path: Path, data: bytes) -> None:
    """Refuse an archive with anything ``torch.export.load`` would unpickle unsafely or run.

    Raises:
        ModelError: names the file and the first offending entry.
    """

    def refuse(entry: str, problem: str) -> ModelError:
        return ModelError(f"{path}: entry '{entry}' {problem}; {NO_CODE}")

    try:
        if "version" in zipfile.ZipFile(io.BytesIO(data)).namelist():  # torch.export.load's fallback
            raise refuse(
                "version", "marks torch's pre-2.7 format, read with pickle (re-save it with torch.export.save)"
            )
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = set(reader.get_file_names())
    except ModelError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, torch's RuntimeError, AssertionError on the format
        raise ModelError(f"{path}: not a torch.export program: {type(exc).__name__}: {first_line(exc)}") from None
    compiled = sorted(name for name in names if name.startswith(pt2.AOTINDUCTOR_DIR))
    if compiled:
        raise refuse(compiled[0], "is compiled code (AOTInductor)")
    models = sorted(name for name in names if name.startswith(pt2.MODELS_DIR) and name.endswith(".json"))
    if not models:
        raise ModelError(f"{path}: not a torch.export program: no entry '{pt2.MODELS_FILENAME_FORMAT.format('model')}'")
    read = _Reader(path, reader, names)
    for name in models:
        model = name.removeprefix(pt2.MODELS_DIR).removesuffix(".json")
        read.tensors_only(pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), refuse)
        _check_payloads(read, model, refuse)
        try:
            module = next(_imported_modules(read.json(name)), None)
        except RecursionError:  # torch's own JSON reading would fail on it too
            raise ModelError(f"{path}: entry '{name}' is nested too deeply to be a torch.export program") from None
        if module is not None:
            raise refuse(name, f"names a Python module to import ('{module}') in a pytree spec")


def _check_payloads(read: _Reader, model: str, refuse: Callable[[str, str], ModelError]) -> None:
    """Weights and constants: raw tensors only (a ``use_pickle`` entry is read with ``weights_only=False``,
    a custom or opaque object with TorchScript's or Python's unpickler)."""
    for directory, config, kind in (
        (pt2.WEIGHTS_DIR, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, "weight"),
        (pt2.CONSTANTS_DIR, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, "constant"),
    ):
        legacy_file = f"{directory}{model}.pt"  # the older layout: all of them in one torch.save file
        if legacy_file in read.names:
            read.tensors_only(legacy_file, refuse)
            continue
        entries = read.json(config.format(model)).get("config", {})
        if not isinstance(entries, dict) or not all(isinstance(meta, dict) for meta in entries.values()):
            raise ModelError(f"{read.path}: entry '{config.format(model)}' is not a torch.export payload config")
        for entry, meta in entries.items():
            record = f"{directory}{meta.get('path_name', '')}"
            if meta.get("use_pickle"):
                raise refuse(record, f"({kind} '{entry}') is a pickled object")
            if kind == "constant" and not str(meta.get("path_name", "")).startswith(
                pt2.TENSOR_CONSTANT_FILENAME_PREFIX
            ):
                raise refuse(record, f"(constant '{entry}') is a Python object, not a tensor")


class _Reader:
    """Entries of one archive, read for checking; a missing or malformed one is a one-line error."""

    def __init__(self, path: Path, reader: PT2ArchiveReader, names: set[str]) -> None:
        self.path, self.reader, self.names = path, reader, names

    def _bytes(self, entry: str) -> bytes:
        if entry not in self.names:
            raise ModelError(f"{self.path}: not a complete torch.export program: no entry '{entry}'")
        return self.reader.read_bytes(entry)

    def json(self, entry: str) -> dict[str, Any]:
        try:
            value = json.loads(self._bytes(entry))
        except ValueError as exc:
            raise ModelError(f"{self.path}: entry '{entry}' is not valid JSON: {first_line(exc)}") from None
        if not isinstance(value, dict):
            raise ModelError(f"{self.path}: entry '{entry}' is not a JSON object")
        return value

    def tensors_only(self, entry: str, refuse: Callable[[str, str], ModelError]) -> None:
        """torch reads this entry with ``weights_only=True`` and, should that fail, without it:
        it must pass the weights-only unpickler, so the fallback never meets anything else."""
        try:
            torch.load(io.BytesIO(self._bytes(entry)), map_location="cpu", weights_only=True)
        except ModelError:
            raise
        except Exception:  # pickle.UnpicklingError for forbidden objects, RuntimeError for junk
            raise refuse(entry, "holds Python objects, not just tensors") from None


def _imported_modules(value: Any) -> Iterator[str]:
    """Modules that reading pytree specs in ``value`` (a program's JSON) would import:
    ``torch.utils._pytree`` imports the module named by an enum key or by a defaultdict's default
    factory. All of the program is searched, not only the input and output specs torch 2.13 reads."""
    if isinstance(value, dict):
        if "__enum__" in value:
            yield str(value.get("fqn", "")).partition(":")[0]
        if "default_factory_module" in value:
            yield str(value["default_factory_module"])
        for item in value.values():
            yield from _imported_modules(item)
    elif isinstance(value, list):
        for item in value:
            yield from _imported_modules(item)
    elif isinstance(value, str):  # torch parses contexts again, with a hook that imports enum modules
        try:
            inner = json.loads(value)
        except ValueError:
            return
        if isinstance(inner, dict | list):
            yield from _imported_modules(inner)

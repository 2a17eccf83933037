"""Exceptions the user can cause. ``cli.py`` turns each into one line of output and an exit code.

Also the two helpers every one-line message uses.
"""

import difflib
from collections.abc import Iterable


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the closest choice, or ``""``."""
    hint = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{hint[0]}'? " if hint else ""


class FmapError(Exception):
    """Base class: something fmap cannot do with what it was given; ``str()`` is the user's message."""


class ModelError(FmapError):
    """A model or its weights cannot be loaded (names the file or source and the reason)."""


class SpecError(ModelError):
    """A model spec file is invalid (names the file, the layer and the key)."""


class ImageError(FmapError):
    """An image could not be read or decoded (names the file)."""


class UnknownLayerError(FmapError):
    """A requested layer name does not exist in the model."""


class UsageError(FmapError):
    """Options that cannot work together, or a value out of range (exit code 2 at the CLI)."""


class FmapFileError(FmapError):
    """A file that is not a complete fmap HDF5 file, or is corrupt."""


class VerificationError(FmapError):
    """A stored pair did not satisfy a == f(z) when re-checked."""


class StoppedError(FmapError):
    """The run was stopped by a signal (SIGTERM from a scheduler, SIGINT from Ctrl-C)."""

    def __init__(self, signum: int, kept: str = "") -> None:
        super().__init__(f"interrupted by signal {signum}; " + (kept or "no output written"))
        self.signum = signum

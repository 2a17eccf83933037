"""Exceptions the user can cause. ``cli.py`` turns each into one line of output and an exit code."""


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

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}; no output written")
        self.signum = signum

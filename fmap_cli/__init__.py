"""fmap: extract the feature maps of a CNN, pre-activation z and activation a, into HDF5.

Kept import-free on purpose: ``fmap --help`` and ``fmap inspect`` must not pay for torch.
"""

__version__ = "0.1.0"

"""featcache: run a frozen ImageNet conv base once, cache its features in HDF5, fit heads in seconds."""

__version__ = "0.1.0"


class FeatcacheError(Exception):
    """A user-facing problem: one line that names what is wrong and how to fix it."""

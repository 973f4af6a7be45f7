"""featcache: run a frozen ImageNet conv base once, cache its features in HDF5, fit heads in seconds.

The public Python API is ``__all__``; ``featcache/api.py`` documents it. Every name is imported
lazily, when first used, so ``import featcache`` starts no TensorFlow, Keras or scikit-learn.

``featcache.extract``, ``featcache.compare`` and ``featcache.predict`` are at once the submodules of
those names (``from featcache import extract`` has always given the extraction module, and its
attributes stay reachable) and the API functions: calling the module calls ``featcache.api``'s
function of the same name. Python holds one object per attribute, and only a module that can be
called is both.
"""

import importlib
import inspect
import sys
import types

__version__ = "0.1.0"


class FeatcacheError(Exception):
    """A user-facing problem: one line that names what is wrong and how to fix it."""


_LAZY = {"open_cache": "featcache.api", "fit_head": "featcache.api", "export": "featcache.api",
         "Cache": "featcache.cache"}
_CALLABLE_MODULES = ("extract", "compare", "predict")
__all__ = ["Cache", "FeatcacheError", "__version__", "compare", "export", "extract", "fit_head", "open_cache",
           "predict"]


class _ApiModule(types.ModuleType):
    """A submodule that, called, runs the API function of its name."""

    def __call__(self, *args, **kwargs):
        return self._function()(*args, **kwargs)

    def _function(self):
        return getattr(importlib.import_module("featcache.api"), self.__name__.rpartition(".")[2])

    @property
    def __signature__(self):
        return inspect.signature(self._function())


class _Package(types.ModuleType):
    """featcache itself: whichever way a callable submodule was imported, it is callable when reached
    through the package (``featcache.extract``, ``from featcache import extract``)."""

    def __getattribute__(self, name):
        if name in _CALLABLE_MODULES:
            module = importlib.import_module(f"featcache.{name}")
            if not isinstance(module, _ApiModule):
                module.__class__ = _ApiModule
            return module
        return super().__getattribute__(name)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package

"""kvstress: a long-context stress tester for KV-cache compression.

Importing the package loads neither torch nor transformers (the CLI answers bad options
and `kvstress plot`/`report` without them); `make_cache` loads them on first use.
"""

from .spec import MethodSpec, SpecError, parse_spec

__version__ = "0.1.0"

__all__ = ["MethodSpec", "SpecError", "make_cache", "parse_spec", "__version__"]


def __getattr__(name: str):
    if name == "make_cache":
        from .caches import make_cache

        return make_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

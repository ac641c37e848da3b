"""kvstress: a long-context stress tester for KV-cache compression."""

from .caches import make_cache
from .spec import MethodSpec, SpecError, parse_spec

__version__ = "0.1.0"

__all__ = ["MethodSpec", "SpecError", "make_cache", "parse_spec", "__version__"]

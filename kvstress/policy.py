"""What a cache policy declares (see kvstress.spec): its parameters and its declaration.

Torch-free, like the declarations of the built-in policies (kvstress.policies): a method
spec is parsed and checked before torch loads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import SpecError

# The generic size flags' default capacity; the other sizes default per policy (Params).
DEFAULT_CAPACITY = 256
# A fixed-capacity cache's position modes (--positions): absolute, or inside the cache.
POSITION_MODES = ("original", "shifted")

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*")


@dataclass(frozen=True, kw_only=True)
class Params:
    """Base of a policy's parameters: subclass it as a frozen, kw_only dataclass of ints.

    The fields, in declaration order, are the spec string's numbers, each written as the
    upper-case initial of its name in the spec form (sink → S, window → W, capacity → C).
    A field without a default must be given. The generic sizes are checked here for
    every policy that has them:

        sink       tokens from the start kept for good (attention sinks), 0 or more
        window     most recent tokens kept; None resolves to capacity // 8 (at least
                   `min_window`)
        capacity   most tokens held per sequence and KV head; positive, and above
                   sink + window so that the policy has slots of its own to choose

    Policy-specific rules go in `check()`, raising SpecError with a message that names
    the fix.
    """

    min_window = 0  # the smallest recent window the policy works with
    rest = "slots to choose"  # what fills capacity - sink - window, for the message when nothing does

    def __post_init__(self) -> None:
        names = {field.name for field in dataclasses.fields(self)}
        capacity = getattr(self, "capacity", None)
        if "capacity" in names and capacity <= 0:
            raise SpecError(f"capacity must be positive, got {capacity}")
        if "sink" in names and self.sink < 0:
            raise SpecError(f"sink must be 0 or more, got {self.sink}")
        if "window" in names:
            if self.window is None:
                object.__setattr__(self, "window", max(self.min_window, capacity // 8))
            elif self.window < self.min_window:
                raise SpecError(f"window must be at least {self.min_window}, got {self.window}")
        if "capacity" in names:
            sink, window = getattr(self, "sink", 0), getattr(self, "window", 0)
            if capacity <= sink + window:
                kept = f"{sink} sinks" + (f" and a {window}-token window" if window else "")
                raise SpecError(f"capacity {capacity} leaves no {self.rest} after {kept}: "
                                f"use a capacity above {sink + window}")
        self.check()

    def check(self) -> None:
        """Policy-specific validation, after the generic sizes are checked."""

    @classmethod
    def default_text(cls, field: dataclasses.Field) -> str:
        if field.name == "window" and field.default is None:
            return f"capacity // 8{f' (at least {cls.min_window})' if cls.min_window else ''}"
        if field.default is dataclasses.MISSING:
            return f"{DEFAULT_CAPACITY} (--capacity)" if field.name == "capacity" else "required"
        return str(field.default)


def letter(field: dataclasses.Field) -> str:
    """How a parameter is written in a spec form: the upper-case initial of its name."""
    return field.name[0].upper()


@dataclass(frozen=True)
class Policy:
    """A cache policy as the registry knows it.

    cache: a `kvstress.caches.CompressedCache` subclass for a policy with a capacity
    (built with the model's attention links; position modes, lazy eviction and
    --compile apply), or a function `(spec, model) -> transformers Cache` for one
    without (transformers' own caches: the full cache, the quantized cache).
    """

    name: str
    params: type[Params]
    description: str
    cache: Callable[..., Any] | None  # None: a built-in policy, whose cache kvstress.caches holds
    in_all: bool = False  # run by `--method all`
    # Whether each KV head decides its own evictions. A policy that pools a layer's heads
    # (the authors' TOVA) cannot run sharded by heads (--tp) without gathering the ranks.
    per_head: bool = True

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"policy name {self.name!r} must be lower-case letters and digits, starting with a letter")
        # A dataclass subclassing Params is frozen (dataclasses refuse a thawed child of a frozen one).
        if not (isinstance(self.params, type) and issubclass(self.params, Params)):
            raise TypeError(f"policy {self.name}: params must be a dataclass subclassing kvstress.spec.Params")

    @property
    def fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.params)

    @property
    def form(self) -> str:
        """The spec string's shape, e.g. ``h2o_S_W_C``."""
        return "_".join([self.name] + [letter(field) for field in self.fields])

    @property
    def is_compressed(self) -> bool:
        """Whether the policy holds a fixed capacity (a kvstress CompressedCache)."""
        return any(field.name == "capacity" for field in self.fields)

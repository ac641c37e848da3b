"""Method specs: the one name for a cache policy and its sizes.

A spec has two spellings that mean the same thing: the string ``h2o_4_32_256`` and
the fields ``method="h2o", sink=4, window=32, capacity=256``. Results, plots and
reports name every method by its string; the CLI accepts either.

    baseline            the full cache, every token kept
    streaming_S_C       S attention sinks + the C - S most recent tokens
    h2o_S_W_C           S sinks + W most recent + C - S - W heavy hitters
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METHODS = ("baseline", "streaming", "h2o")

_SPEC_PATTERN = re.compile(r"^(baseline|streaming|h2o)((?:_-?\d+)*)$")


class SpecError(ValueError):
    """A method spec that cannot be built; the message says how to fix it."""


@dataclass(frozen=True)
class MethodSpec:
    method: str
    capacity: int | None = None
    sink: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(
                f"unknown method {self.method!r}: use one of {', '.join(METHODS)}"
            )
        if self.method == "baseline":
            if self.capacity is not None or self.sink or self.window:
                raise SpecError("baseline keeps every token: give it no capacity, sink or window")
            return
        if self.capacity is None:
            raise SpecError(f"{self.method} needs a capacity: add --capacity N (e.g. 256)")
        if self.capacity <= 0:
            raise SpecError(f"capacity must be positive, got {self.capacity}")
        if self.sink < 0:
            raise SpecError(f"sink must be 0 or more, got {self.sink}")
        if self.method == "streaming":
            if self.window:
                raise SpecError(
                    "streaming keeps the capacity minus the sinks as its recent window: drop --window"
                )
            if self.capacity <= self.sink:
                raise SpecError(
                    f"streaming capacity {self.capacity} leaves no room for recent tokens after "
                    f"{self.sink} sinks: use a capacity above {self.sink}"
                )
        if self.method == "h2o":
            if self.window <= 0:
                raise SpecError(
                    f"h2o window must be at least 1 (the newest token), got {self.window}"
                )
            if self.capacity <= self.sink + self.window:
                raise SpecError(
                    f"h2o capacity {self.capacity} leaves no heavy hitters after {self.sink} sinks "
                    f"and a {self.window}-token window: use a capacity above {self.sink + self.window}"
                )

    @property
    def name(self) -> str:
        """The spec string, e.g. ``h2o_4_32_256``."""
        if self.method == "baseline":
            return "baseline"
        if self.method == "streaming":
            return f"streaming_{self.sink}_{self.capacity}"
        return f"h2o_{self.sink}_{self.window}_{self.capacity}"

    @property
    def heavy_hitters(self) -> int:
        """Slots left for heavy hitters (H2O only; 0 for the others)."""
        if self.method != "h2o":
            return 0
        return self.capacity - self.sink - self.window

    @property
    def is_compressed(self) -> bool:
        return self.method != "baseline"

    def __str__(self) -> str:
        return self.name


def parse_spec(text: str) -> MethodSpec:
    """Parse ``baseline``, ``streaming_S_C`` or ``h2o_S_W_C``."""
    cleaned = text.strip().lower()
    match = _SPEC_PATTERN.match(cleaned)
    if not match:
        raise SpecError(
            f"cannot read method spec {text!r}: write baseline, streaming_S_C or h2o_S_W_C "
            "(e.g. streaming_4_256, h2o_4_32_256)"
        )
    method = match.group(1)
    numbers = [int(part) for part in match.group(2).split("_")[1:]]
    expected = {"baseline": 0, "streaming": 2, "h2o": 3}[method]
    if len(numbers) != expected:
        shape = {"baseline": "baseline", "streaming": "streaming_S_C", "h2o": "h2o_S_W_C"}[method]
        raise SpecError(f"method spec {text!r} should look like {shape}")
    if method == "baseline":
        return MethodSpec("baseline")
    if method == "streaming":
        sink, capacity = numbers
        return MethodSpec("streaming", capacity=capacity, sink=sink)
    sink, window, capacity = numbers
    return MethodSpec("h2o", capacity=capacity, sink=sink, window=window)


def as_spec(spec: str | MethodSpec) -> MethodSpec:
    """Accept either spelling."""
    return spec if isinstance(spec, MethodSpec) else parse_spec(spec)

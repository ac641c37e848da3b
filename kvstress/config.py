"""The validated run configuration: everything the runner needs, checked before any model loads."""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .caches import POSITION_MODES
from .spec import MethodSpec, SpecError, parse_spec

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768, 50000)


class ConfigError(ValueError):
    """A user mistake in the run's options; the message says how to fix it."""


def parse_length(text: str) -> int:
    """`2k` → 2048, `50000` → 50000, `1.5k` → 1536."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", text)
    if not match:
        raise ConfigError(f"cannot read length {text!r}: write a token count like 2048 or 2k")
    value = float(match.group(1)) * (1024 if match.group(2) else 1)
    if value != int(value) or value <= 0:
        raise ConfigError(f"length {text!r} must be a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str) -> tuple[int, ...]:
    lengths = tuple(parse_length(part) for part in text.split(",") if part.strip())
    if not lengths:
        raise ConfigError("--lengths is empty: give increasing token counts, e.g. 2k,4k,8k")
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ConfigError(f"--lengths must increase, got {','.join(map(str, lengths))}: e.g. 2k,4k,8k")
    return lengths


def build_methods(
    methods: list[str], capacity: int | None, sink: int | None, window: int | None
) -> tuple[MethodSpec, ...]:
    """Turn --method values (names, spec strings or `all`) and the size flags into specs.

    `--method h2o --capacity 256` and `--method h2o_4_32_256` are the same; sizes left
    out default to 4 sinks, a window of 1/8 of the capacity (H2O) and capacity 256.
    """
    names: list[str] = []
    for value in methods or ["all"]:
        names.extend(part.strip() for part in value.split(",") if part.strip())
    if "all" in names:
        names = ["baseline", "streaming", "h2o"] + [n for n in names if n not in ("all", "baseline", "streaming", "h2o")]
    specs: list[MethodSpec] = []
    for name in names:
        if name in ("streaming", "h2o"):
            cap = 256 if capacity is None else capacity
            sinks = 4 if sink is None else sink
            if name == "streaming":
                spec = MethodSpec("streaming", capacity=cap, sink=sinks)
            else:
                spec = MethodSpec("h2o", capacity=cap, sink=sinks, window=max(1, cap // 8) if window is None else window)
        else:
            spec = parse_spec(name)
        if spec not in specs:
            specs.append(spec)
    return tuple(specs)


@dataclass(frozen=True)
class RunConfig:
    methods: tuple[MethodSpec, ...]
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    model: str = "smollm2-135m"
    dataset: str | None = None
    chunk: int = 512
    decode_steps: int = 16
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    positions: str = "original"
    lazy: int = 0
    max_memory: int | None = None
    compile: bool = False
    seed: int = 0
    out: Path = field(default=Path("results.json"))

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("no method to run: give --method baseline, streaming, h2o or a spec string")
        if self.chunk <= 0:
            raise ConfigError(f"--chunk must be positive, got {self.chunk}")
        if self.decode_steps < 3:
            raise ConfigError(
                f"--decode-steps must be at least 3 (one warm-up, one timed, one attention probe), got {self.decode_steps}"
            )
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"--positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.lazy < 0:
            raise ConfigError(f"--lazy must be 0 or more tokens, got {self.lazy}")
        if self.compile and self.lazy:
            raise ConfigError("--compile needs --lazy 0: lazy eviction changes the cache's shape every step")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError("--max-memory must be a positive size such as 2GB")
        if any(length <= 0 for length in self.lengths) or list(self.lengths) != sorted(set(self.lengths)):
            raise ConfigError("--lengths must be positive and increasing, e.g. 2k,4k,8k")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def tokens_needed(self) -> int:
        """Text tokens per sequence: the longest context, the decode steps after it, and
        the one token the last step is scored against."""
        return self.lengths[-1] + self.decode_steps + 1

    def to_json(self) -> dict:
        """The config as results files store it (without the output path, which is the file itself)."""
        data = asdict(self)
        data["methods"] = [spec.name for spec in self.methods]
        data["lengths"] = list(self.lengths)
        del data["out"]
        return data

    @classmethod
    def json_defaults(cls) -> dict:
        """Each option's default as results files store it: what a key that a file written
        before the option existed lacks stands for."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING and f.name != "out"}

    @classmethod
    def from_json(cls, data: dict, out: Path) -> "RunConfig":
        fields = dict(data)
        fields["methods"] = tuple(parse_spec(name) for name in fields["methods"])
        fields["lengths"] = tuple(fields["lengths"])
        return cls(out=Path(out), **fields)


__all__ = ["ConfigError", "DEFAULT_LENGTHS", "RunConfig", "SpecError", "build_methods", "parse_length", "parse_lengths"]

"""Validated run configurations: one base for the options every command shares, one subclass per command.

Everything here is checked before any model loads. A config's `to_json()` is what its
results file stores (and what `--resume` compares); the run-control options (force,
resume, isolate, debug) and the output path are how a run is carried out, not what it
measures, so they are not stored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError, KvstressError, TextError
from .policy import POSITION_MODES
from .spec import MethodSpec, SpecError, method_specs, parse_spec

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768, 50000)
# Not part of what a run measures: how it is carried out.
_CONTROL = {"control": True}


def parse_length(text: str) -> int:
    """`2k` → 2048, `50000` → 50000, `1.5k` → 1536."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", text)
    if not match:
        raise ConfigError(f"cannot read length {text!r}: write a token count like 2048 or 2k")
    value = float(match.group(1)) * (1024 if match.group(2) else 1)
    if value != int(value) or value <= 0:
        raise ConfigError(f"length {text!r} must be a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str, option: str = "--lengths") -> tuple[int, ...]:
    lengths = tuple(parse_length(part) for part in text.split(",") if part.strip())
    if not lengths:
        raise ConfigError(f"{option} is empty: give increasing token counts, e.g. 2k,4k,8k")
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ConfigError(f"{option} must increase, got {','.join(map(str, lengths))}: e.g. 2k,4k,8k")
    return lengths


def parse_book(text: str) -> int | str:
    """One --book value: digits are an index in the test split, anything else part of a title."""
    text = text.strip()
    if not text:
        raise TextError("an empty book: give a book index (0 is the first) or part of a title")
    return int(text) if text.isdigit() else text


def parse_books(text: str) -> int | list[int | str]:
    """A --books value: "5" is the first five long-enough books; "0,7,moby dick" those books."""
    parts = text.split(",")
    if len(parts) == 1 and parts[0].strip().isdigit():
        return int(parts[0])
    return [parse_book(part) for part in parts]


def check_books(books: int | Sequence[int | str]) -> None:
    """A --books choice that names at least one book (parse_books' value)."""
    if isinstance(books, int) and books < 1:
        raise TextError(f"asked for {books} PG-19 books: give at least 1")
    if not isinstance(books, int) and not books:
        raise TextError("no PG-19 book was chosen: give a book index or part of a title")


def parse_buckets(text: str | None, tokens: int) -> tuple[tuple[int, ...], str | None]:
    """Bucket end points, increasing, the last one == tokens; and a note when edges were dropped.

    None gives 1k, 2k, 4k, ... below `tokens`, then `tokens`. Edges at or past `tokens`
    are dropped (the last bucket always ends at `tokens`), with a note saying so.
    """
    if text is None:
        edges, edge = [], 1024
        while edge < tokens:
            edges.append(edge)
            edge *= 2
        return tuple(edges) + (tokens,), None
    edges = [parse_length(part) for part in text.split(",") if part.strip()]
    if not edges:
        raise ConfigError("--buckets is empty: give increasing token counts, e.g. 1k,2k,4k")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"--buckets must increase, got {text}: e.g. 1k,2k,4k")
    kept = [edge for edge in edges if edge < tokens]
    dropped = [edge for edge in edges if edge > tokens]
    note = None
    if dropped:
        note = (f"bucket edge(s) {', '.join(map(str, dropped))} lie past --tokens {tokens}: "
                f"the last bucket ends at {tokens}")
    return tuple(kept) + (tokens,), note


def parse_depths(text: str) -> tuple[float, ...]:
    """`0,25,50,75,100` (percent of the haystack) → (0.0, 25.0, 50.0, 75.0, 100.0)."""
    depths: list[float] = []
    for part in text.split(","):
        part = part.strip().rstrip("%").strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"cannot read depth {part!r}: write percentages like 0,25,50,75,100") from None
        if not 0 <= value <= 100:
            raise ConfigError(f"depth {part} is outside 0..100: depths are percent of the haystack")
        if value not in depths:
            depths.append(value)
    if not depths:
        raise ConfigError("--depths is empty: give percentages like 0,25,50,75,100")
    return tuple(sorted(depths))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`1,2,4,8` → (1, 2, 4, 8); positive whole numbers, increasing."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError("--batch-sizes is empty: give increasing batch sizes, e.g. 1,2,4,8")
    sizes = []
    for part in parts:
        if not re.fullmatch(r"\d+", part):
            raise ConfigError(f"--batch-sizes: cannot read {part!r}: give whole numbers such as 1,2,4,8")
        sizes.append(int(part))
    if any(size < 1 for size in sizes):
        raise ConfigError(f"--batch-sizes must be positive, got {text}: e.g. 1,2,4,8")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"--batch-sizes must increase, got {text}: e.g. 1,2,4,8")
    return tuple(sizes)


def build_methods(
    methods: list[str], capacity: int | None, sink: int | None, window: int | None
) -> tuple[MethodSpec, ...]:
    """Turn --method values (policy names, spec strings or `all`) and the size flags into specs.

    `--method h2o --capacity 256` and `--method h2o_4_32_256` are the same; each policy's
    defaults fill the sizes left out (spec.spec_from_flags).
    """
    return method_specs(methods or ["all"], capacity=capacity, sink=sink, window=window)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The options every command shares."""

    kind: ClassVar[str]  # the results file's kind
    decodes: ClassVar[bool] = True  # whether the command has single-token steps (--compile applies)

    methods: tuple[MethodSpec, ...]
    model: str = "smollm2-135m"
    dataset: str | None = None
    book: str | None = None  # a PG-19 book: its index or part of its title
    device: str = "auto"
    dtype: str = "auto"
    positions: str = "original"
    seed: int = 0
    chunk: int = 512
    lazy: int = 0
    max_memory: int | None = None
    compile: bool = False
    tp: int = 1  # tensor-parallel ranks (torchrun; distributed.py)
    device_map: str | None = field(default=None, metadata=_CONTROL)  # refused: see --tp
    out: Path = field(default=Path("results.json"), metadata=_CONTROL)
    force: bool = field(default=False, metadata=_CONTROL)
    resume: bool = field(default=False, metadata=_CONTROL)
    isolate: bool = field(default=False, metadata=_CONTROL)
    debug: bool = field(default=False, metadata=_CONTROL)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("no method to run: give --method with a policy name or spec string (kvstress policies)")
        if self.chunk <= 0:
            raise ConfigError(f"--chunk must be positive, got {self.chunk}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"--positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.lazy < 0:
            raise ConfigError(f"--lazy must be 0 or more tokens, got {self.lazy}")
        if self.compile and self.lazy:
            raise ConfigError("--compile needs --lazy 0: lazy eviction changes the cache's shape every step")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError("--max-memory must be a positive size such as 2GB")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.resume and self.force:
            raise ConfigError("--resume continues the results file and --force replaces it: give one of them")
        if self.tp < 1:
            raise ConfigError(f"--tp must be 1 or more ranks, got {self.tp}")
        if self.tp > 1 and (self.isolate or self.compile):
            raise ConfigError(f"--tp runs each rank in its own process already and is not compiled: drop "
                              f"{'--isolate' if self.isolate else '--compile'} from a --tp {self.tp} run")
        growing = [spec.name for spec in self.methods if getattr(spec.params, "full_layers", 0)]
        if self.compile and growing:
            raise ConfigError(f"{growing[0]} keeps its first layers whole, and they grow every step, but a compiled "
                              f"step needs fixed shapes: drop --compile, or give it no full layers "
                              f"(F = 0 in knorm_S_W_F_C)")
        pooled = [spec.name for spec in self.methods if not spec.policy.per_head]
        if self.tp > 1 and pooled:
            raise ConfigError(f"{pooled[0]} pools the attention of every head of a layer, which --tp splits over "
                              f"ranks: run it without --tp, or use its per-head variant where it has one "
                              f"(tovahead for tova)")
        if self.device_map is not None:
            raise ConfigError("--device-map splits one process's layers over cards, but compressed caches keep every "
                              "layer's buffers on one device: shard by heads instead with "
                              "torchrun --nproc-per-node N -m kvstress ... --tp N")

    @property
    def tokens_needed(self) -> int:
        """Text tokens the run reads."""
        raise NotImplementedError

    def derived_json(self) -> dict:
        """Values computed from the options that a reader of the results file wants spelled out."""
        return {}

    def to_json(self) -> dict:
        """The config as results files store it."""
        data = {}
        for option in fields(self):
            if option.metadata.get("control"):
                continue
            value = getattr(self, option.name)
            if option.name == "methods":
                value = [spec.name for spec in value]
            elif isinstance(value, tuple):
                value = list(value)
            data[option.name] = value
        return data | self.derived_json()

    @classmethod
    def json_defaults(cls) -> dict:
        """Each option's default as results files store it: what a key that a file written
        before the option existed lacks stands for."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING and not f.metadata.get("control")}

    @classmethod
    def from_json(cls, data: dict, **control) -> RunConfig:
        """The config a results file stores, with the run-control options given."""
        names = {f.name for f in fields(cls)}
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items() if key in names}
        values["methods"] = tuple(parse_spec(name) for name in values["methods"])
        return cls(**values, **control)


@dataclass(frozen=True, kw_only=True)
class SweepConfig(RunConfig):
    kind: ClassVar[str] = "sweep"

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    decode_steps: int = 16
    batch_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode_steps < 3:
            raise ConfigError(
                f"--decode-steps must be at least 3 (one warm-up, one timed, one attention probe), got {self.decode_steps}"
            )
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if any(length <= 0 for length in self.lengths) or list(self.lengths) != sorted(set(self.lengths)):
            raise ConfigError("--lengths must be positive and increasing, e.g. 2k,4k,8k")

    @property
    def tokens_needed(self) -> int:
        """Text tokens per sequence: the longest context, the decode steps after it, and
        the one token the last step is scored against."""
        return self.lengths[-1] + self.decode_steps + 1


@dataclass(frozen=True, kw_only=True)
class PplConfig(RunConfig):
    kind: ClassVar[str] = "ppl"
    out: Path = field(default=Path("ppl.json"), metadata=_CONTROL)

    tokens: int = 4096
    buckets: tuple[int, ...] = (4096,)  # bucket ends; the last == tokens
    chunk: int = 1
    books: str | None = None  # several PG-19 books, each one sample: a count or a list of indices/titles

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 1:
            raise ConfigError(f"--tokens must be positive, got {self.tokens}")
        if self.compile and self.chunk != 1:
            raise ConfigError("--compile compiles single-token steps: use --chunk 1 with it")
        if self.books is not None and (self.book is not None or self.dataset not in (None, "pg19")):
            raise ConfigError("--books averages over PG-19 books: use it with --dataset pg19 and without --book")
        if self.books is not None:
            check_books(parse_books(self.books))
        buckets = list(self.buckets)
        if not buckets or buckets[-1] != self.tokens or any(b <= a for a, b in zip(buckets, buckets[1:])) or buckets[0] <= 0:
            raise ConfigError(f"buckets must increase and end at --tokens {self.tokens}, got {buckets}")

    @property
    def tokens_needed(self) -> int:
        return self.tokens + 1  # position p predicts token p + 1

    @property
    def mode(self) -> str:
        return "exact" if self.chunk == 1 else "chunked"

    @property
    def bucket_ranges(self) -> list[tuple[int, int]]:
        """(lo, hi] context-length ranges; predictions at positions [lo, hi)."""
        return list(zip((0,) + self.buckets[:-1], self.buckets))

    def derived_json(self) -> dict:
        return {"buckets": [list(pair) for pair in self.bucket_ranges],
                "mode": self.mode if self.mode == "exact" else f"chunked ({self.chunk} tokens per forward; an approximation)"}

    @classmethod
    def from_json(cls, data: dict, **control) -> PplConfig:
        return super().from_json({**data, "buckets": [hi for _, hi in data["buckets"]]}, **control)


@dataclass(frozen=True, kw_only=True)
class NeedleConfig(RunConfig):
    kind: ClassVar[str] = "needle"
    out: Path = field(default=Path("needle.json"), metadata=_CONTROL)

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)  # percent of the haystack
    needles: int = 3
    max_new_tokens: int = 24
    chat: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lengths or list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] <= 0:
            raise ConfigError("--lengths must be positive and increasing, e.g. 1k,2k,4k")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ConfigError("--depths must be percentages between 0 and 100, e.g. 0,50,100")
        if self.needles < 1:
            raise ConfigError(f"--needles must be at least 1 per cell, got {self.needles}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def tokens_needed(self) -> int:
        return self.lengths[-1]  # the haystack corpus: at least one whole prompt's worth


@dataclass(frozen=True, kw_only=True)
class BatchConfig(RunConfig):
    kind: ClassVar[str] = "batch"
    out: Path = field(default=Path("batch.json"), metadata=_CONTROL)

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    length: int = 4096
    max_batch: int | None = None
    find_max_batch: bool = False
    decode_steps: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes) or any(
            b <= a for a, b in zip(self.batch_sizes, self.batch_sizes[1:])
        ):
            raise ConfigError(f"--batch-sizes must be positive and increasing, got {list(self.batch_sizes)}: e.g. 1,2,4,8")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.length < 1:
            raise ConfigError(f"--length must be a positive number of tokens, got {self.length}")
        if not self.find_max_batch and not self.sweep_sizes:
            raise ConfigError(
                f"no --batch-sizes value is at or below --max-batch {self.max_batch}: "
                f"raise --max-batch or give smaller --batch-sizes"
            )
        self.point_config(1)  # a point's own checks (decode steps)

    def point_config(self, batch_size: int) -> SweepConfig:
        """One point as a sweep: one checkpoint at `length`, `batch_size` sequences."""
        shared = {f.name: getattr(self, f.name) for f in fields(RunConfig)}
        return SweepConfig(**shared, lengths=(self.length,), decode_steps=self.decode_steps, batch_size=batch_size)

    @property
    def sweep_sizes(self) -> tuple[int, ...]:
        """The batch sizes the default sweep tries: --batch-sizes up to --max-batch."""
        return tuple(b for b in self.batch_sizes if self.max_batch is None or b <= self.max_batch)

    @property
    def search_limit(self) -> int:
        """--find-max-batch's upper bound: --max-batch, else the largest --batch-sizes value."""
        return self.max_batch if self.max_batch is not None else self.batch_sizes[-1]

    @property
    def largest_batch(self) -> int:
        """The largest batch this run may try (the text must hold that many sequences)."""
        return self.search_limit if self.find_max_batch else self.sweep_sizes[-1]

    @property
    def tokens_per_sequence(self) -> int:
        return self.point_config(1).tokens_needed

    @property
    def tokens_needed(self) -> int:
        return self.largest_batch * self.tokens_per_sequence

    def derived_json(self) -> dict:
        return {"search": "find-max-batch" if self.find_max_batch else "sweep",
                "search_limit": self.search_limit if self.find_max_batch else None,
                "tokens_per_sequence": self.tokens_per_sequence}


__all__ = [
    "BatchConfig", "ConfigError", "DEFAULT_LENGTHS", "KvstressError", "NeedleConfig", "PplConfig", "RunConfig",
    "SpecError", "SweepConfig", "build_methods", "parse_length", "parse_lengths",
]

"""Validated run configurations: one base for the options every command shares, one subclass per command.

Everything here is checked before any model loads. A config's `to_json()` is what its
results file stores (and what `--resume` compares); the run-control options (force,
resume, isolate, debug) and the output path are how a run is carried out, not what it
measures, so they are not stored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError, KvstressError, TextError
from .policy import POSITION_MODES
from .ruler import ANSWER_TOKENS, TASKS
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


def launch_problem(tp: int) -> str | None:
    """Why this process, as it was launched, cannot run with --tp `tp` (one line naming the
    fix), or None. --tp N runs one process per rank under torchrun; and each of torchrun's
    processes needs --tp, or every one would run the whole job into the same results file."""
    world = os.environ.get("WORLD_SIZE")
    launched = world is not None and "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if tp == 1:
        if launched and int(world) > 1:
            return (f"torchrun started {world} processes but --tp is 1, so each would run the whole job into the "
                    f"same results file: add --tp {world} to shard the model over them, or run kvstress without "
                    "torchrun")
        return None
    if not launched:
        return (f"--tp {tp} runs one process per rank: launch it with "
                f"torchrun --nproc-per-node {tp} -m kvstress <command> ... --tp {tp}")
    if int(world) != tp:
        return (f"--tp {tp} but torchrun started {world} processes: give torchrun --nproc-per-node {tp} "
                f"(times --nnodes) or --tp {world}")
    return None


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
        for choice in ("device", "dtype", "positions"):  # spelled in any case, as method specs are
            object.__setattr__(self, choice, getattr(self, choice).strip().lower())
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

    task: str = "needle"  # ruler.TASKS: kvstress's needle, RULER's multikey or vartrack
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)  # percent of the haystack
    needles: int = 3
    max_new_tokens: int | None = None  # None: the task's (ruler.ANSWER_TOKENS); stored resolved
    chat: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ConfigError(f"unknown --task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", ANSWER_TOKENS[self.task])
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


# --- kvstress frontier ----------------------------------------------------------------

# `kvstress frontier` without --method: the seed's three policies and every other built-in family.
FRONTIER_POLICIES = ("baseline", "streaming", "h2o", "tova", "knorm", "random", "quant")
# A spec whose last field the budget fills: h2o_4_32_C, quant_2_C.
_TEMPLATE = re.compile(r"([a-z][a-z0-9]*)((?:_\d+)*)_c")
_FRACTION = re.compile(r"\d*\.\d*")


def parse_budgets(text: str) -> tuple[int, ...] | tuple[float, ...]:
    """`128,256,2k` → token counts; `0.1,0.25` → fractions of the full cache's bytes; never mixed."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError("--budgets is empty: give token counts (128,256,512) or fractions of the full cache's "
                          "bytes (0.1,0.25,0.5)")
    budgets: list[int | float] = []
    for part in parts:
        if _FRACTION.fullmatch(part):
            value = float(part)
            if not 0 < value < 1:
                raise ConfigError(f"--budgets {part}: a fraction of the full cache's bytes lies strictly between 0 "
                                  "and 1 (the full cache itself is the baseline point): e.g. 0.1,0.25,0.5")
            budgets.append(value)
        else:
            try:
                budgets.append(parse_length(part))
            except ConfigError as error:
                raise ConfigError(f"--budgets: {error}") from None
    if len({type(budget) for budget in budgets}) > 1:
        raise ConfigError(f"--budgets {text} mixes token counts and fractions: give all as tokens (128,256,512) "
                          "or all as fractions of the full cache's bytes (0.1,0.25,0.5)")
    if any(b <= a for a, b in zip(budgets, budgets[1:])):
        raise ConfigError(f"--budgets must increase, got {text}: e.g. 128,256,512")
    return tuple(budgets)


def budget_tokens(budget: int | float, tokens: int) -> int:
    """The capacity a budget gives at a run of `tokens` tokens. A fraction f is round(f * tokens):
    f of the full cache's bytes for a cache that holds that many tokens in every layer at the
    full cache's precision (what a cache with whole layers or fewer bits holds, its measured
    bytes say)."""
    capacity = round(budget * tokens) if isinstance(budget, float) else budget
    if capacity < 1:
        raise ConfigError(f"--budgets {budget} of --tokens {tokens} is less than one token: give a larger fraction")
    if capacity >= tokens:
        raise ConfigError(f"--budgets {budget} ({capacity} tokens) is not below --tokens {tokens}: a cache that "
                          f"holds every token is the full cache (the baseline point); give budgets below {tokens}")
    return capacity


@dataclass(frozen=True)
class FrontierPoint:
    """One method of a frontier: its spec, the --method value it came from, and its budget."""

    method: MethodSpec
    policy: str  # a policy name or a template such as h2o_4_126_C: one line of the figure
    budget: int | float | None  # as given; None: the full cache, or a spec with no budget (quant_4_128)
    capacity: int | None  # what the budget put in the spec's capacity (quant: its residual)

    def to_json(self) -> dict:
        return {"method": self.method.name, "policy": self.policy, "budget": self.budget, "capacity": self.capacity}


def _budgeted(policy, label: str, numbers: list[int] | None, capacity: int, sink: int | None,
              window: int | None) -> MethodSpec:
    """`policy` with the budget in its capacity (or, for a policy without one, its last field:
    quant's full-precision residual); the other fields as the template gives them, else the
    size flags and the policy's defaults."""
    names = [f.name for f in policy.fields]
    target = "capacity" if "capacity" in names else names[-1]
    if numbers is None:
        values = {key: value for key, value in (("sink", sink), ("window", window)) if key in names and value is not None}
    else:
        if len(numbers) != len(names) - 1:
            raise ConfigError(f"--method {label} should look like {policy.form[: -len(target[0])]}C "
                              "(every number but the budgeted last one)")
        values = dict(zip(names[:-1], numbers))
    try:
        return MethodSpec(policy.name, **values, **{target: capacity})
    except SpecError as error:
        raise ConfigError(f"--budgets {capacity} tokens for {label}: {error}") from None


def frontier_plan(policies: Sequence[str], budgets: Sequence[int | float], tokens: int, *,
                  sink: int | None = None, window: int | None = None) -> tuple[FrontierPoint, ...]:
    """Every method of a frontier: the full cache first, then each policy at each budget.

    A policy is a name (`h2o`: the budget is its capacity, its other sizes the flags' or its
    defaults, so h2o's window stays capacity // 8), a template whose last field is `C`
    (`h2o_4_126_C`), or a spec of a policy without a capacity (`quant_4_128`), which is one
    point placed by its bytes. The full cache takes no budget.
    """
    from .spec import find_policy

    if not budgets:
        raise ConfigError("--budgets is empty: give token counts (128,256,512) or fractions (0.1,0.25,0.5)")
    capacities = [budget_tokens(budget, tokens) for budget in budgets]
    values = [part.strip().lower() for value in policies for part in value.split(",") if part.strip()]
    values = [name for value in values for name in (FRONTIER_POLICIES if value == "all" else (value,))]
    points = {"baseline": FrontierPoint(parse_spec("baseline"), "baseline", None, None)}
    for value in values:
        template = _TEMPLATE.fullmatch(value)
        name = template.group(1) if template else value.split("_")[0]
        policy = find_policy(name)
        if not policy.fields:
            if template or value != name:
                raise ConfigError(f"--method {value}: {name} keeps every token and takes no budget: write {name}")
            continue  # the full cache: one point, first
        if template is None and value != name:
            spec = parse_spec(value)
            if spec.capacity is not None:
                raise ConfigError(f"--method {value} fixes its capacity, which the budgets set in a frontier: "
                                  f"write {value.rpartition('_')[0]}_C or {name}")
            points.setdefault(spec.name, FrontierPoint(spec, value, None, None))
            continue
        numbers = [int(n) for n in template.group(2).split("_")[1:]] if template else None
        label = f"{value[:-1]}C" if template else value
        for budget, capacity in zip(budgets, capacities):
            spec = _budgeted(policy, label, numbers, capacity, sink, window)
            points.setdefault(spec.name, FrontierPoint(spec, label, budget, capacity))
    return tuple(points.values())


@dataclass(frozen=True, kw_only=True)
class FrontierConfig(RunConfig):
    """`kvstress frontier`: every policy at every budget, measured by the ppl and needle schedules
    and an interleaved decode-cost step (frontier.py). `methods` is the plan's (frontier_plan)."""

    kind: ClassVar[str] = "frontier"
    out: Path = field(default=Path("frontier.json"), metadata=_CONTROL)

    policies: tuple[str, ...] = FRONTIER_POLICIES
    budgets: tuple[int | float, ...] = (0.0625, 0.125, 0.25, 0.5)
    sink: int | None = None  # the size flags, for policies given by name
    window: int | None = None
    tokens: int = 4096  # the run's length: perplexity, decode cost and the fractions' reference
    ppl_chunk: int = 1  # 1: exact streaming perplexity; more: chunked, an approximation
    books: str | None = None
    needle_lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.0, 50.0, 100.0)
    needles: int = 1
    tasks: tuple[str, ...] = ("needle",)  # ruler.TASKS
    max_new_tokens: int | None = None  # None: each task's own
    decode_steps: int = 16  # per cache, interleaved with StreamingLLM's at the same budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.books is not None and (self.book is not None or self.dataset not in (None, "pg19", "shakespeare")):
            raise ConfigError("--books averages over several books: use it with --dataset pg19 or shakespeare "
                              "(each play one book) and without --book")
        if self.books is not None:
            check_books(parse_books(self.books))
        if self.decode_steps < 3:
            raise ConfigError(f"--decode-steps must be at least 3 (one warm-up step, then timed ones), "
                              f"got {self.decode_steps}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--tasks must name each task once, e.g. {','.join(TASKS)}")
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown:
            raise ConfigError(f"unknown --tasks {','.join(unknown)}: use some of {', '.join(TASKS)}")
        self.ppl_config()
        for task in self.tasks:
            self.needle_config(task)
        if tuple(point.method for point in self.plan) != self.methods:
            raise ValueError("FrontierConfig.methods must be its plan's: build it with frontier_plan")

    @property
    def plan(self) -> tuple[FrontierPoint, ...]:
        return frontier_plan(self.policies, self.budgets, self.tokens, sink=self.sink, window=self.window)

    def _shared(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(RunConfig)}

    def ppl_config(self) -> PplConfig:
        """The perplexity part: the same options, one text (or each book) of --tokens tokens."""
        return PplConfig(**{**self._shared(), "chunk": self.ppl_chunk}, tokens=self.tokens,
                         buckets=parse_buckets(None, self.tokens)[0])

    def needle_config(self, task: str) -> NeedleConfig:
        """The retrieval part for one task (ruler.TASKS: the needle in a haystack, RULER's multikey, vartrack)."""
        return NeedleConfig(**self._shared(), task=task, lengths=self.needle_lengths, depths=self.depths,
                            needles=self.needles, max_new_tokens=self.max_new_tokens)

    @property
    def tokens_needed(self) -> int:
        """The run's length, the decode steps after it and the token the last one reads; a needle
        haystack at least as long as its longest prompt."""
        return max(self.tokens + self.decode_steps + 1, self.needle_lengths[-1])

    def derived_json(self) -> dict:
        return {"ppl_mode": self.ppl_config().derived_json()["mode"],
                "plan": [point.to_json() for point in self.plan]}

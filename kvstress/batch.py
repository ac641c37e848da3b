"""Batch-size throughput: how many sequences fit at one context length, and how fast they decode.

    kvstress batch --length 4k --batch-sizes 1,2,4,8 --method baseline --method h2o_4_32_256
    kvstress batch --length 16k --find-max-batch --max-batch 256 --model random:llama-2-7b

A compressed cache saves memory; this turns the saving into tokens per second. For
each method, every sequence of a batch is a different segment of the text (each H2O
sequence evicts its own tokens), all at the same context length. Each (method, batch
size) point is one ordinary SweepRunner stream with lengths=(length,) and that batch
size: chunked prefill to the length, then the decode steps, whose median time per
step is the TPOT. The record the runner writes (kind "batch") carries

    batch_size, tpot_ms_median / p90, throughput_tok_s = batch_size * 1000 / TPOT median
    (generated tokens per second over all sequences), peak memory, cache_bytes, and
    status "ok" or "oom" (a real OOM or the --max-memory budget).

Perplexity is not measured (score=False): it is not what this study asks, and the
all-position logits it needs would add batch × chunk × vocabulary floats to the peak.

Two ways to walk the batch sizes, per method:

    sweep            (default) every --batch-sizes value up to --max-batch, in order,
                     until the first OOM.
    --find-max-batch doubling 1, 2, 4, ... (the last probe clamped to the limit) until
                     the first OOM or the limit, then a binary search between the
                     last batch that fit and the first that did not. Every probe is a
                     fresh runner and a record; an OOM probe is an "oom" record. The
                     limit is --max-batch, or the largest --batch-sizes value (64 by
                     default) when --max-batch is not given.

Either way an event {"type": "max_batch", "method", "batch_size", "first_oom",
"limited_by", "search", "probes"} records the largest batch that fit: batch_size is
null when even batch 1 ran out of memory; limited_by says whether an OOM or the
limit ended the search ("--max-batch" / "--batch-sizes": the true maximum may be larger).

The text is loaded once, for the largest batch the run may need (the largest size
of the sweep, or the search limit) × (length + decode steps + 1) tokens. A text too
short for that is a user error before the model loads, naming the largest batch the
text allows: batch sizes are never capped silently.

Memory is freed between points (stream.free_memory at the start of each point, and
before it the freed heap is handed back to the OS with glibc's malloc_trim, so that
peak RSS starts from the same floor at every point). On CPU peak RSS is still the
whole process's resident memory (weights, activations, allocator slack):
cache_bytes (the KV cache's own tensors) is the exact measure there.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .caches import POSITION_MODES
from .config import ConfigError, RunConfig
from .results import RECORD_FIELDS
from .spec import MethodSpec

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_LENGTH = 4096
MAX_BATCH_EVENT = "max_batch"

Notify = Callable[[str], None]
ProgressCallback = Callable[[str, int], None]  # (method name, tokens just processed per sequence)
# Given a point's label and its tokens per sequence, a context manager yielding its progress callback.
ProgressFactory = Callable[[str, int], AbstractContextManager[ProgressCallback | None]]


# --- configuration ------------------------------------------------------------------


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


@dataclass(frozen=True)
class BatchConfig:
    methods: tuple[MethodSpec, ...]
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    length: int = DEFAULT_LENGTH
    max_batch: int | None = None
    find_max_batch: bool = False
    model: str = "smollm2-135m"
    dataset: str | None = None
    chunk: int = 512
    decode_steps: int = 16
    device: str = "auto"
    dtype: str = "auto"
    positions: str = "original"
    max_memory: int | None = None
    seed: int = 0
    out: Path = field(default=Path("batch.json"))

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes) or any(
            b <= a for a, b in zip(self.batch_sizes, self.batch_sizes[1:])
        ):
            raise ConfigError(f"--batch-sizes must be positive and increasing, got {list(self.batch_sizes)}: e.g. 1,2,4,8")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.length < 1:
            raise ConfigError(f"--length must be a positive number of tokens, got {self.length}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"--positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if not self.find_max_batch and not self.sweep_sizes:
            raise ConfigError(
                f"no --batch-sizes value is at or below --max-batch {self.max_batch}: "
                f"raise --max-batch or give smaller --batch-sizes"
            )
        self.run_config(1)  # the runner's own checks (chunk, decode steps, device, budget, methods)

    def run_config(self, batch_size: int) -> RunConfig:
        """The RunConfig of one point: one checkpoint at `length`, `batch_size` sequences."""
        return RunConfig(
            methods=self.methods, lengths=(self.length,), model=self.model, dataset=self.dataset,
            chunk=self.chunk, decode_steps=self.decode_steps, batch_size=batch_size, device=self.device,
            dtype=self.dtype, positions=self.positions, max_memory=self.max_memory, seed=self.seed,
            out=self.out,
        )

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
        return self.run_config(1).tokens_needed

    def to_json(self) -> dict:
        data = asdict(self)
        data["methods"] = [spec.name for spec in self.methods]
        data["batch_sizes"] = list(self.batch_sizes)
        data["out"] = str(self.out)
        data["search"] = "find-max-batch" if self.find_max_batch else "sweep"
        data["search_limit"] = self.search_limit if self.find_max_batch else None
        data["tokens_per_sequence"] = self.tokens_per_sequence
        return data


# --- searching ----------------------------------------------------------------------


def find_max_batch(fits: Callable[[int], bool], limit: int) -> tuple[int | None, int | None, list[int]]:
    """The largest batch in 1..limit for which fits(batch) is true, assuming fitting is monotone.

    Doubling 1, 2, 4, ... (the last step clamped to `limit`) until the first failure or
    `limit`, then a binary search between the last fit and the first failure. Returns
    (largest fit or None, first failure or None, every batch probed in order).
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    probes: list[int] = []

    def probe(batch: int) -> bool:
        probes.append(batch)
        return fits(batch)

    last_fit, first_fail, batch = None, None, 1
    while True:
        if not probe(batch):
            first_fail = batch
            break
        last_fit = batch
        if batch >= limit:
            return last_fit, None, probes
        batch = min(batch * 2, limit)
    low = last_fit or 0  # fits (0: nothing fits yet)
    high = first_fail  # does not fit
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle):
            low = middle
        else:
            high = middle
    return (low or None), high, probes


# --- the run ------------------------------------------------------------------------


@dataclass
class BatchRun:
    """What run_batch did: every record in order and, per method, the largest batch that fit."""

    config: BatchConfig
    records: list[dict]
    max_batch: dict[str, dict]  # method → its max_batch event
    text_name: str
    text_description: str


class TextTooShort(ConfigError):
    """The text cannot hold the largest batch of the run."""


def load_batch_text(config: BatchConfig, tokenizer):
    """The text (texts.TextSource) holding config.largest_batch segments of tokens_per_sequence tokens.

    Raises a one-line error naming the largest batch the text allows when it is too short.
    """
    from .texts import TextError, load_text

    per_sequence = config.tokens_per_sequence
    needed = config.largest_batch * per_sequence
    try:
        return load_text(config.dataset, tokenizer, needed)
    except TextError as error:
        match = re.match(r"(.+) has only (\d+) tokens but the longest length asked for is", str(error))
        if match is None:
            raise
        name, available = match.group(1), int(match.group(2))
    allowed = available // per_sequence
    what = "--max-batch" if config.find_max_batch else "the largest --batch-sizes value"
    if allowed == 0:
        fix = "use a shorter --length or a longer text"
    else:
        fix = f"use --max-batch {allowed} or smaller --batch-sizes, a shorter --length, or a longer text"
    raise TextTooShort(
        f"{name} has only {available} tokens but {what} {config.largest_batch} needs {config.largest_batch} × "
        f"{per_sequence} = {needed} (each sequence a different segment of --length {config.length} plus "
        f"{config.decode_steps + 1} decode tokens); the text allows batches up to {allowed}: {fix}"
    ) from None


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim), so that
    one point's peak RSS does not include memory the allocator kept from a bigger point before it."""
    gc.collect()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: RSS may then carry over between points (cache_bytes is exact)
    trim(0)


def _oom_record(spec: MethodSpec, config: RunConfig, message: str) -> dict:
    record = dict.fromkeys(RECORD_FIELDS, None)
    record.update(method=spec.name, length=config.lengths[-1], status="oom", batch_size=config.batch_size, error=message)
    return record


class _PointWriter:
    """The results writer as one point's SweepRunner sees it: writes go to the run's file,
    but `records` holds this point's records only.

    A SweepRunner may skip (method, length) points that its writer already holds (resume);
    every point of a batch run has the same method and length, so each one must start
    with none of the others counted as done.
    """

    def __init__(self, writer) -> None:
        self._writer = writer
        self.records: list[dict] = []

    def add_record(self, record: dict) -> dict:
        full = self._writer.add_record(record)
        self.records.append(full)
        return full

    def add_samples(self, samples: list[dict]) -> None:
        self._writer.add_samples(samples)

    def add_event(self, event: dict) -> dict:
        return self._writer.add_event(event)


class BatchRunner:
    """Measures (method, batch size) points, each one a fresh SweepRunner stream."""

    def __init__(self, config: BatchConfig, model, text_tokens: torch.Tensor, writer, *,
                 notify: Notify = lambda message: None, progress: ProgressFactory | None = None):
        self.config = config
        self.model = model
        self.device = next(model.parameters()).device
        self.text_tokens = text_tokens  # 1-D ids, at least largest_batch × tokens_per_sequence
        self.writer = writer
        self.notify = notify
        self.progress = progress or (lambda label, total: contextlib.nullcontext())
        self.records: list[dict] = []
        self._base = config.run_config(1)

    def measure(self, spec: MethodSpec, batch_size: int) -> dict:
        """One point: the record the runner wrote (status ok or oom)."""
        from .stream import SweepRunner, free_memory
        from .texts import text_segments

        config = replace(self._base, batch_size=batch_size, methods=(spec,))
        release_host_memory()
        tokens = text_segments(self.text_tokens, batch_size, config.tokens_needed)
        with self.progress(f"{spec.name} × {batch_size}", config.tokens_needed - 1) as advance:
            point_writer = _PointWriter(self.writer)
            runner = SweepRunner(config, self.model, tokens, point_writer, score=False, on_progress=advance)
            try:
                records = runner.run_method(spec, config.lengths)
                if not records:
                    raise RuntimeError(f"the runner skipped {spec.name} at batch {batch_size}: nothing was measured")
                record = records[-1]
            except torch.OutOfMemoryError as error:
                # SweepRunner catches OOM in the measured stream; its warm-up stream runs before that.
                message = str(error).splitlines()[0] if str(error) else "out of memory"
                runner = error = None
                free_memory(self.device)
                self.writer.add_event({"method": spec.name, "type": "oom", "length": config.lengths[-1],
                                       "batch_size": batch_size, "tokens_seen": 0,
                                       "message": f"{message} (in the warm-up stream)"})
                record = self.writer.add_record(_oom_record(spec, config, message))
        # The next point's run_method frees memory (stream.free_memory) before it starts.
        del runner, tokens
        self.records.append(record)
        self.notify(_describe_point(record))
        return record

    def sweep(self, spec: MethodSpec) -> dict:
        """Every sweep size in order until the first OOM; returns the max_batch event."""
        probes, last_fit, first_oom = [], None, None
        for batch_size in self.config.sweep_sizes:
            probes.append(batch_size)
            if self.measure(spec, batch_size)["status"] == "ok":
                last_fit = batch_size
            else:
                first_oom = batch_size
                break
        limited_by = "oom" if first_oom is not None else (
            "--max-batch" if self.config.max_batch is not None and self.config.max_batch < self.config.batch_sizes[-1]
            else "--batch-sizes"
        )
        return self._record_max(spec, last_fit, first_oom, limited_by, "sweep", probes)

    def search(self, spec: MethodSpec) -> dict:
        """--find-max-batch: doubling, then binary search; returns the max_batch event."""
        best, first_oom, probes = find_max_batch(
            lambda batch_size: self.measure(spec, batch_size)["status"] == "ok", self.config.search_limit
        )
        limited_by = "oom" if first_oom is not None else (
            "--max-batch" if self.config.max_batch is not None else "--batch-sizes"
        )
        return self._record_max(spec, best, first_oom, limited_by, "find-max-batch", probes)

    def _record_max(self, spec, best, first_oom, limited_by, search, probes) -> dict:
        event = self.writer.add_event({
            "type": MAX_BATCH_EVENT, "method": spec.name, "batch_size": best, "first_oom": first_oom,
            "limited_by": limited_by, "search": search, "probes": list(probes), "length": self.config.length,
        })
        self.notify(describe_max_batch(event))
        return event

    def run(self) -> dict[str, dict]:
        found = {}
        for spec in self.config.methods:
            found[spec.name] = self.search(spec) if self.config.find_max_batch else self.sweep(spec)
        return found


def _describe_point(record: dict) -> str:
    head = f"{record['method']} batch {record['batch_size']}:"
    if record["status"] != "ok":
        return f"{head} out of memory — {record['error']}"
    return f"{head} {record['throughput_tok_s']:.1f} tok/s (TPOT {record['tpot_ms_median']:.2f} ms)"


def describe_max_batch(event: dict) -> str:
    """One line: the largest batch that fit and what ended the search."""
    method, best = event["method"], event["batch_size"]
    if best is None:
        return f"{method}: even batch 1 ran out of memory at {event['length']} tokens"
    if event["limited_by"] == "oom":
        return f"{method}: largest batch that fits is {best} (batch {event['first_oom']} ran out of memory)"
    return f"{method}: largest batch that fits is at least {best} (no OOM up to the {event['limited_by']} limit)"


def run_batch(config: BatchConfig, *, force: bool = False, notify: Notify = lambda message: None,
              progress: ProgressFactory | None = None) -> BatchRun:
    """Load text and model, measure every method's batch sizes, write config.out (kind "batch").

    The text is loaded (and its length checked) before the results file is created and
    before the model loads, so a text too short leaves nothing behind.
    """
    from . import models
    from .results import ResultsError, ResultsWriter, environment

    torch_device = models.resolve_device(config.device)
    if config.out.exists() and not force:
        raise ResultsError(
            f"results file {config.out} already exists: choose another output path, delete it, or use --force"
        )
    tokenizer = models.load_tokenizer(config.model)
    text = load_batch_text(config, tokenizer)
    writer = ResultsWriter(config.out, "batch", config.to_json(), environment(torch_device), overwrite=force)
    notify(f"text: {text.description}")
    writer.add_event({"type": "dataset", "name": text.name, "message": text.description})
    if text.fallback_note:
        notify(f"note: {text.fallback_note}")
        writer.add_event({"type": "fallback", "message": text.fallback_note})
    loaded = models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    notify(f"model: {loaded.name} — {loaded.source}")
    writer.add_event({"type": "model", "name": loaded.name, "pretrained": loaded.pretrained, "message": loaded.source})
    plan = (f"find the largest batch up to {config.search_limit} (doubling, then binary search)"
            if config.find_max_batch else f"batch sizes {', '.join(map(str, config.sweep_sizes))}, until OOM")
    notify(f"plan: {plan}, {config.length}-token context, each sequence a different text segment")

    runner = BatchRunner(config, loaded.model, text.tokens, writer, notify=notify, progress=progress)
    found = runner.run()
    writer.finish()
    return BatchRun(config, runner.records, found, text.name, text.description)


def largest_batches(events: Sequence[dict]) -> dict[str, dict]:
    """method → its (last) max_batch event, from a results file's events."""
    return {event["method"]: event for event in events if event.get("type") == MAX_BATCH_EVENT}

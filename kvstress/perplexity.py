"""Streaming perplexity under a compressed KV cache: `kvstress ppl` and `kvstress compare`.

Every token of a text is scored by the model whose cache is the compressed one, as
the StreamingLLM paper measures it:

    exact    (--chunk 1)  one token per forward: the prediction at position p sees
                          exactly what the cache kept of tokens 0..p
    chunked  (--chunk N)  N tokens per forward, all N logits scored. Faster, but an
                          APPROXIMATION: a token inside a chunk also attends to the
                          chunk's earlier tokens that a per-token cache would already
                          have evicted (the cache evicts back to capacity after each
                          forward), so chunked perplexity is optimistic once the text
                          is longer than the capacity.

Position p's logits (float32) predict token p + 1. With --tokens N the text holds
N + 1 tokens, N forwards' worth of positions are fed and N predictions are scored.
A prediction's *context length* is p + 1 (the tokens it has seen); length buckets
(lo, hi] group predictions by context length and partition all N of them.

Results (kind "ppl", see results.py) are written as the run goes, one method after
the other:

    per method × bucket  length = bucket end, nll_mean, perplexity, tokens_scored
                         (that bucket's), status "ok"; every other field null
    per method, overall  length = N, nll_mean / perplexity / tokens_scored over all N,
                         batch_size 1, tpot_ms_median / p90 (forward time per token),
                         throughput_tok_s (N / total forward time), attn_ms_mean,
                         peak memory, cache_bytes, cache_tokens; and right after it an
                         event {"type": "ppl_overall", "method", "record": its index in
                         "records", "length": N, "total_s": total forward time}.
                         The event is what marks the record as the overall one: its
                         length may equal the last bucket's end.
    out of memory        a record with status "oom" at the bucket it was heading for,
                         and an "oom" event; the next method runs.

Timing: each forward is synchronized and timed on the host clock. The last forward
of a bucket that took several forwards is an attention-time probe (hooks on every
attention module, see stream.AttentionTimer); it counts in the total time but not in
the TPOT statistics.
"""

from __future__ import annotations

import math
import statistics
import time
import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .caches import POSITION_MODES, cache_bytes, cached_tokens, make_run_cache
from .config import ConfigError, parse_length
from .memory import MemorySampler
from .report import OVERALL_EVENT
from .results import RECORD_FIELDS
from .spec import MethodSpec, parse_spec
from .stream import AttentionTimer, cache_argument, free_memory, percentile, synchronize

DEFAULT_TOKENS = 4096
# The seed experiment's six configurations (SEED_RESULTS.md).
COMPARE_METHODS = ("baseline", "streaming_8_256", "streaming_8_512", "h2o_4_32_256", "h2o_8_32_256", "h2o_8_64_512")
COMPARE_DATASETS = ("pg19", "wikitext")
_WARMUP_TOKENS = 16
# exp() of a mean NLL above this overflows a float: the perplexity is then not a number.
_MAX_NLL = 700.0

ProgressCallback = Callable[[str, int], None]  # (method name, tokens just scored)
# Given the config about to run, a context manager yielding its progress callback; entered
# only once text and model are loaded, so nothing is drawn before a loading error.
ProgressFactory = Callable[["PplConfig"], AbstractContextManager[ProgressCallback | None]]


# --- configuration ------------------------------------------------------------------


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


@dataclass(frozen=True)
class PplConfig:
    methods: tuple[MethodSpec, ...]
    tokens: int = DEFAULT_TOKENS
    buckets: tuple[int, ...] = (DEFAULT_TOKENS,)  # bucket ends; the last == tokens
    model: str = "smollm2-135m"
    dataset: str | None = None
    chunk: int = 1
    device: str = "auto"
    dtype: str = "auto"
    positions: str = "original"
    seed: int = 0
    out: Path = field(default=Path("ppl.json"))

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("no method to run: give --method baseline, streaming, h2o or a spec string")
        if self.tokens < 1:
            raise ConfigError(f"--tokens must be positive, got {self.tokens}")
        if self.chunk <= 0:
            raise ConfigError(f"--chunk must be positive (1 = exact), got {self.chunk}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"--positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        buckets = list(self.buckets)
        if not buckets or buckets[-1] != self.tokens or any(b <= a for a, b in zip(buckets, buckets[1:])) or buckets[0] <= 0:
            raise ConfigError(f"buckets must increase and end at --tokens {self.tokens}, got {buckets}")

    @property
    def mode(self) -> str:
        return "exact" if self.chunk == 1 else "chunked"

    @property
    def bucket_ranges(self) -> list[tuple[int, int]]:
        """(lo, hi] context-length ranges; predictions at positions [lo, hi)."""
        return list(zip((0,) + self.buckets[:-1], self.buckets))

    def to_json(self) -> dict:
        data = asdict(self)
        data["methods"] = [spec.name for spec in self.methods]
        data["buckets"] = [list(pair) for pair in self.bucket_ranges]
        data["out"] = str(self.out)
        data["mode"] = self.mode if self.mode == "exact" else f"chunked ({self.chunk} tokens per forward; an approximation)"
        return data


# --- the runner ---------------------------------------------------------------------


def _perplexity(nll_mean: float) -> float | None:
    return math.exp(nll_mean) if nll_mean < _MAX_NLL else None


class PerplexityRunner:
    """Scores one text ([1, tokens + 1] ids) under each method and writes records as it goes."""

    def __init__(self, config: PplConfig, model, tokens: torch.Tensor, writer, *,
                 on_progress: ProgressCallback | None = None):
        if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] < config.tokens + 1:
            raise ValueError(f"tokens must be [1, >= {config.tokens + 1}], got {tuple(tokens.shape)}")
        self.config = config
        self.model = model
        self.device = next(model.parameters()).device
        self.tokens = tokens[:, : config.tokens + 1].to(self.device)
        self.writer = writer
        self.on_progress = on_progress or (lambda method, n: None)
        self.sampler = MemorySampler(self.device)
        self.cache_argument = cache_argument(model)
        self.overall: dict[str, dict] = {}  # method → its overall record, once written

    def _new_cache(self, spec: MethodSpec):
        return make_run_cache(spec, self.model, positions=self.config.positions, lazy=0)

    def _forward(self, cache, nll: torch.Tensor, start: int, end: int) -> None:
        """Feed tokens [start, end); write the NLL of predicting tokens start+1 .. end into nll[start:end]."""
        with torch.no_grad():
            output = self.model(
                input_ids=self.tokens[:, start:end], use_cache=True, logits_to_keep=0,
                **{self.cache_argument: cache},
            )
            # logits [1, q, vocab] → [q, vocab], float32 before the softmax.
            logits = output.logits[0].float()
            nll[start:end] = F.cross_entropy(logits, self.tokens[0, start + 1 : end + 1], reduction="none")
        del output, logits

    def _warm_up(self, spec: MethodSpec) -> None:
        cache = self._new_cache(spec)
        scratch = torch.empty(_WARMUP_TOKENS, dtype=torch.float32, device=self.device)
        n = min(_WARMUP_TOKENS, self.config.tokens)
        self._forward(cache, scratch, 0, max(1, n - 2))
        for position in range(max(1, n - 2), n):
            self._forward(cache, scratch, position, position + 1)
        synchronize(self.device)

    def run_method(self, spec: MethodSpec) -> list[dict]:
        """Score the text under `spec`; returns the records written (an OOM ends it early)."""
        config = self.config
        free_memory(self.device)
        self._warm_up(spec)
        self.sampler.reset_peak()
        cache = self._new_cache(spec)
        nll = torch.empty(config.tokens, dtype=torch.float32, device=self.device)
        per_token_ms: list[float] = []
        attention_ms: list[float] = []
        total_s = 0.0
        position = 0
        records: list[dict] = []
        failure, heading_for = None, config.buckets[0]
        try:
            for lo, hi in config.bucket_ranges:
                heading_for = hi
                first = True
                while position < hi:
                    end = min(position + config.chunk, hi)
                    probe = end == hi and not first
                    synchronize(self.device)
                    began = time.perf_counter()
                    if probe:
                        with AttentionTimer(self.model, self.device) as timer:
                            self._forward(cache, nll, position, end)
                    else:
                        self._forward(cache, nll, position, end)
                    synchronize(self.device)
                    elapsed = time.perf_counter() - began
                    total_s += elapsed
                    if probe:
                        attention_ms.append(timer.total_s * 1000 / (end - position))
                    else:
                        per_token_ms.append(elapsed * 1000 / (end - position))
                    self.sampler.sample(cache_bytes(cache))
                    self.on_progress(spec.name, end - position)
                    position, first = end, False
                bucket_nll = nll[lo:hi].double().sum().item() / (hi - lo)
                records.append(self.writer.add_record({
                    "method": spec.name, "length": hi, "status": "ok",
                    "nll_mean": bucket_nll, "perplexity": _perplexity(bucket_nll), "tokens_scored": hi - lo,
                }))
        except torch.OutOfMemoryError as error:
            # Keep only the message: the exception's frames hold the cache and activations alive.
            failure = str(error).splitlines()[0] if str(error) else "out of memory"
        if failure is not None:
            cache = nll = None
            free_memory(self.device)
            self.writer.add_event({"method": spec.name, "type": "oom", "length": heading_for,
                                   "tokens_seen": position, "message": failure})
            oom = dict.fromkeys(RECORD_FIELDS, None)
            oom.update(method=spec.name, length=heading_for, status="oom", batch_size=1, error=failure)
            records.append(self.writer.add_record(oom))
            return records

        nll_mean = nll.double().sum().item() / config.tokens
        peak = self.sampler.peak_record()
        tpot = statistics.median(per_token_ms) if per_token_ms else None
        overall = self.writer.add_record({
            "method": spec.name, "length": config.tokens, "status": "ok", "batch_size": 1,
            "tpot_ms_median": tpot,
            "tpot_ms_p90": percentile(per_token_ms, 0.9) if per_token_ms else None,
            "throughput_tok_s": config.tokens / total_s if total_s > 0 else None,
            "attn_ms_mean": statistics.fmean(attention_ms) if attention_ms else None,
            **peak,
            "cache_bytes": cache_bytes(cache),
            "cache_tokens": cached_tokens(cache),
            "nll_mean": nll_mean,
            "perplexity": _perplexity(nll_mean),
            "tokens_scored": config.tokens,
        })
        records.append(overall)
        self.overall[spec.name] = overall
        self.writer.add_event({"type": OVERALL_EVENT, "method": spec.name, "record": len(self.writer.records) - 1,
                               "length": config.tokens, "total_s": total_s})
        return records


# --- whole runs ---------------------------------------------------------------------


Notify = Callable[[str], None]


@dataclass
class PplRun:
    """What run_ppl did: the records written and the text it scored."""

    config: PplConfig
    records: list[dict]
    overall: dict[str, dict]  # method → its overall record (the others are buckets or OOMs)
    text_name: str
    text_description: str


def load_ppl_text(dataset: str | None, tokenizer, tokens: int):
    """The text to score: TextSource with at least tokens + 1 ids (texts.load_text)."""
    from .texts import load_text

    return load_text(dataset, tokenizer, tokens + 1)


def run_ppl(config: PplConfig, *, loaded=None, text=None, force: bool = False,
            notify: Notify = lambda message: None, progress: ProgressFactory | None = None,
            bucket_note: str | None = None) -> PplRun:
    """Load (unless given) text and model, score under every method, write config.out.

    The results file is created first, so an output path that cannot be written fails
    before anything loads. `loaded` (models.LoadedModel) and `text` (texts.TextSource)
    let `compare` load the model once for several texts.
    """
    from . import models
    from .results import ResultsWriter, environment

    torch_device = models.resolve_device(config.device)
    writer = ResultsWriter(config.out, "ppl", config.to_json(), environment(torch_device), overwrite=force)
    if bucket_note:
        notify(f"note: {bucket_note}")
        writer.add_event({"type": "buckets", "message": bucket_note})
    if text is None:
        tokenizer = loaded.tokenizer if loaded is not None else models.load_tokenizer(config.model)
        text = load_ppl_text(config.dataset, tokenizer, config.tokens)
    notify(f"text: {text.description}")
    writer.add_event({"type": "dataset", "name": text.name, "message": text.description})
    if text.fallback_note:
        notify(f"note: {text.fallback_note}")
        writer.add_event({"type": "fallback", "message": text.fallback_note})
    if loaded is None:
        loaded = models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    notify(f"model: {loaded.name} — {loaded.source}")
    writer.add_event({"type": "model", "name": loaded.name, "pretrained": loaded.pretrained, "message": loaded.source})
    if not loaded.pretrained:
        notify("note: random weights: these perplexities only compare methods with each other")
    if config.mode == "chunked":
        notify(f"note: chunked mode ({config.chunk} tokens per forward) approximates streaming perplexity; --chunk 1 is exact")

    tokens = text.tokens[: config.tokens + 1].unsqueeze(0)
    records = []
    with (progress or (lambda config: contextlib.nullcontext()))(config) as on_progress:
        runner = PerplexityRunner(config, loaded.model, tokens, writer, on_progress=on_progress)
        for spec in config.methods:
            method_records = runner.run_method(spec)
            records.extend(method_records)
            if method_records and method_records[-1]["status"] == "oom":
                last = method_records[-1]
                notify(f"{spec.name}: out of memory heading for {last['length']} tokens — {last['error']}")
    writer.finish()
    return PplRun(config, records, runner.overall, text.name, text.description)


def dataset_file_stem(dataset: str) -> str:
    """pg19 → pg19; a file path → its stem (for compare's one results file per dataset)."""
    return Path(dataset).stem if dataset not in ("pg19", "wikitext", "shakespeare") else dataset


@dataclass
class CompareRun:
    written: list[Path]
    skipped: dict[str, str]  # dataset → why it could not be loaded


def run_compare(datasets: Sequence[str], *, tokens: int, chunk: int, model: str, out_dir: Path,
                device: str = "auto", dtype: str = "auto", positions: str = "original",
                buckets: str | None = None, force: bool = False, notify: Notify = lambda message: None,
                progress: ProgressFactory | None = None) -> CompareRun:
    """The seed's six configurations on each dataset: one ppl results file per dataset in out_dir.

    A dataset that cannot be loaded is skipped with a note; none at all is a TextError.
    """
    from . import models
    from .texts import TextError

    if not datasets:
        raise ConfigError("--datasets is empty: give e.g. pg19,wikitext or shakespeare")
    methods = tuple(parse_spec(name) for name in COMPARE_METHODS)
    edges, bucket_note = parse_buckets(buckets, tokens)
    configs = [
        PplConfig(methods=methods, tokens=tokens, buckets=edges, model=model, dataset=name, chunk=chunk,
                  device=device, dtype=dtype, positions=positions,
                  out=Path(out_dir) / f"{dataset_file_stem(name)}.json")
        for name in datasets
    ]
    if len({c.out for c in configs}) != len(configs):
        raise ConfigError(f"--datasets {','.join(datasets)} would write two results files with one name: name each once")
    if not force:
        for c in configs:
            if c.out.exists():
                from .results import ResultsError

                raise ResultsError(f"results file {c.out} already exists: use --force, another --out-dir, or delete it")
    models.resolve_device(device)
    tokenizer = models.load_tokenizer(model)
    texts, skipped = {}, {}
    for name in datasets:
        try:
            texts[name] = load_ppl_text(name, tokenizer, tokens)
        except TextError as error:
            skipped[name] = str(error)
            notify(f"note: skipping dataset {name}: {error}")
    if not texts:
        raise TextError(
            f"none of the datasets {', '.join(datasets)} could be loaded (see the notes above): "
            "use --datasets shakespeare (bundled, offline) or a text file"
        )
    loaded = models.load_model(model, device=device, dtype=dtype)
    written = []
    for config in configs:
        if config.dataset not in texts:
            continue
        notify(f"dataset {config.dataset}: {len(methods)} methods, {tokens} tokens, {config.mode} mode")
        run_ppl(config, loaded=loaded, text=texts[config.dataset], force=force, notify=notify,
                progress=progress, bucket_note=bucket_note)
        written.append(config.out)
    return CompareRun(written, skipped)


__all__ = [
    "COMPARE_DATASETS", "COMPARE_METHODS", "CompareRun", "DEFAULT_TOKENS", "PerplexityRunner", "PplConfig",
    "PplRun", "load_ppl_text", "parse_buckets", "run_compare", "run_ppl",
]

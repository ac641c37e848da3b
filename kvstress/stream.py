"""The runner: stream a text through the model under each cache policy and measure.

For each method, one stream of the text:

    prefill chunks ──► checkpoint L ──► decode steps (teacher-forced) ──► prefill chunks ──► ...
                                         step 0        TTFT(L) = time to build the context + this step
                                         steps 1..k-2  TPOT samples (median, p90)
                                         step k-1      attention-time probe (hooks, excluded from TPOT)

Memory is sampled after every forward; the NLL of every next token is accumulated
(real weights only) so each checkpoint also carries the perplexity of the text so
far. An out-of-memory error (real, or the --max-memory budget) ends the method with
an "oom" record at the checkpoint it was heading for; the next method starts clean.
Results go to the writer as each checkpoint finishes.
"""

from __future__ import annotations

import gc
import inspect
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .caches import cache_bytes, cached_tokens, make_run_cache
from .caches.hooks import attention_modules
from .config import RunConfig
from .memory import MemoryBudget, MemorySampler
from .caches.compiled import CompiledDecode
from .results import RECORD_FIELDS
from .spec import MethodSpec

ProgressCallback = Callable[[str, int], None]  # (method name, tokens just processed)

# Tokens of the warm-up stream run before each method is measured.
_WARMUP_TOKENS = 64
# Decode steps a compiled step needs before it is measured: compilation, then on CUDA
# a warm-up run and the graph recording.
_COMPILED_WARMUP_STEPS = 3


def cache_argument(model) -> str:
    """The forward's name for the cache: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


@contextmanager
def stop_on_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C once: the run stops after the current step, keeping what it measured. Twice: now.

    Yields the function the runner polls; the previous handler is restored on exit.
    """
    requested = threading.Event()

    def handle(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def load_run_text(config: RunConfig):
    """The text for a run, as [batch, tokens_needed] ids; fails (TextError) before any model loads."""
    from . import models, texts

    tokenizer = models.load_tokenizer(config.model)
    text = texts.load_text(config.dataset, tokenizer, config.tokens_needed * config.batch_size)
    return text, texts.text_segments(text.tokens, config.batch_size, config.tokens_needed)


def load_run_model(config: RunConfig):
    from . import models

    return models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)


def free_memory(device: torch.device) -> None:
    """Between methods (never between steps: a growing cache would then reallocate every step)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class AttentionTimer:
    """Wall time spent inside the attention modules during one forward (synchronised on CUDA)."""

    def __init__(self, model, device: torch.device):
        self.modules = attention_modules(model)
        self.device = device
        self.total_s = 0.0
        self._started = 0.0
        self._handles = []

    def __enter__(self) -> "AttentionTimer":
        def start(module, args, kwargs):
            synchronize(self.device)
            self._started = time.perf_counter()

        def stop(module, args, kwargs, output):
            synchronize(self.device)
            self.total_s += time.perf_counter() - self._started

        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(start, with_kwargs=True))
            self._handles.append(module.register_forward_hook(stop, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class FinishedPoints:
    """What a results file already holds: measured points, and methods that ran out of memory."""

    points: frozenset[tuple[str, int]] = frozenset()
    ended: frozenset[str] = frozenset()

    @classmethod
    def from_records(cls, records: list[dict]) -> "FinishedPoints":
        done = [r for r in records if r["status"] in ("ok", "oom")]
        return cls(frozenset((r["method"], r["length"]) for r in done),
                   frozenset(r["method"] for r in done if r["status"] == "oom"))

    def covers(self, method: str, lengths: tuple[int, ...]) -> bool:
        return method in self.ended or all((method, length) in self.points for length in lengths)


@dataclass
class _Stream:
    """State of one method's stream through the text."""

    spec: MethodSpec
    cache: object
    position: int = 0  # tokens of context fed so far
    forwards: int = 0
    build_s: float = 0.0  # time spent building the context so far
    nll_sum: float = 0.0
    nll_count: int = 0


class RunInterrupted(Exception):
    """The user asked the run to stop (Ctrl-C); everything finished is already written."""


class SweepRunner:
    def __init__(self, config: RunConfig, model, tokens: torch.Tensor, writer, *, score: bool,
                 on_progress: ProgressCallback | None = None,
                 stop_requested: Callable[[], bool] = lambda: False,
                 finished: "FinishedPoints | None" = None):
        """tokens: [batch, >= config.tokens_needed] teacher-forcing text. score: compute NLL (real weights).

        stop_requested is polled after every forward (Ctrl-C). finished says which points
        a resumed run already has; by default, those in the writer's file.
        """
        self.config = config
        self.stop_requested = stop_requested
        self.finished = finished if finished is not None else FinishedPoints.from_records(writer.records)
        self.model = model
        self.device = next(model.parameters()).device
        self.tokens = tokens.to(self.device)
        self.writer = writer
        self.score = score
        self.on_progress = on_progress or (lambda method, tokens: None)
        self.sampler = MemorySampler(self.device)
        self.budget = None
        if config.max_memory is not None:
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            self.budget = MemoryBudget(config.max_memory, base_bytes=weights)
        self.cache_argument = cache_argument(model)
        self.compiled_decode = CompiledDecode(model, self.cache_argument) if config.compile else None
        self._started = time.perf_counter()

    # -- one forward ---------------------------------------------------------------

    def _forward(self, stream: _Stream, start: int, end: int, phase: str, *, compiled: bool = False) -> float:
        """Feed tokens [start, end) and return the forward's wall time in seconds.

        compiled: a decode step through `--compile`'s compiled step (eager where it does not apply)."""
        ids = self.tokens[:, start:end]
        keep = 0 if self.score else 1  # all logits only when they are scored (see DESIGN: logits_to_keep)
        synchronize(self.device)
        began = time.perf_counter()
        with torch.no_grad():
            if compiled and self.compiled_decode is not None:
                logits = self.compiled_decode(stream.cache, ids)
            else:
                logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep,
                                    **{self.cache_argument: stream.cache}).logits
        synchronize(self.device)
        elapsed = time.perf_counter() - began
        if self.score:
            self._accumulate_nll(stream, logits, start, end)
        del logits
        stream.position = end
        stream.forwards += 1
        stream.build_s += elapsed
        sample = self.sampler.sample(cache_bytes(stream.cache))
        self._samples.append(
            {"method": stream.spec.name, "step": stream.forwards, "tokens_seen": end, "phase": phase,
             "elapsed_s": time.perf_counter() - self._started, **sample}
        )
        if self.budget is not None:
            self.budget.check(sample)
        self.on_progress(stream.spec.name, end - start)
        if self.stop_requested():
            raise RunInterrupted(f"stopped by the user at {end} tokens of {stream.spec.name}")
        return elapsed

    def _accumulate_nll(self, stream: _Stream, logits: torch.Tensor, start: int, end: int) -> None:
        # Position i predicts token i + 1; the text holds one token past the last forward.
        targets = self.tokens[:, start + 1 : end + 1]
        logits = logits[:, : targets.shape[1]]
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="sum")
        stream.nll_sum += nll.item()
        stream.nll_count += targets.numel()

    # -- a method ------------------------------------------------------------------

    def _new_cache(self, spec: MethodSpec):
        return make_run_cache(spec, self.model, positions=self.config.positions, lazy=self.config.lazy)

    def _start_stream(self, spec: MethodSpec) -> _Stream:
        """A new stream, after a short warm-up so the first measured forward pays no one-off start-up costs."""
        cache = self._new_cache(spec)
        if self.compiled_decode is not None and spec.is_compressed:
            # Warm up (compile, record CUDA graphs) on the stream's own cache, then empty it:
            # its buffers keep the shapes and addresses the compiled step was made for.
            self._warm_up_compiled(cache)
            cache.reset()
        else:
            self._warm_up(self._new_cache(spec))
        return _Stream(spec, cache)

    def _warm_up(self, cache) -> None:
        ids = self.tokens[:, : _WARMUP_TOKENS + 2]
        with torch.no_grad():
            self.model(input_ids=ids[:, :_WARMUP_TOKENS], use_cache=True, logits_to_keep=1, **{self.cache_argument: cache})
            for t in range(_WARMUP_TOKENS, _WARMUP_TOKENS + 2):
                self.model(input_ids=ids[:, t : t + 1], use_cache=True, logits_to_keep=1, **{self.cache_argument: cache})
        synchronize(self.device)

    def _warm_up_compiled(self, cache) -> None:
        """Fill the cache in prefill-sized chunks until decode steps compile, then run a few."""
        available = self.tokens.shape[1] - _COMPILED_WARMUP_STEPS
        position = 0
        with torch.no_grad():
            while not CompiledDecode.compiles(cache, self.tokens[:, :1]) and position < available:
                end = min(position + self.config.chunk, available)
                self.model(input_ids=self.tokens[:, position:end], use_cache=True, logits_to_keep=1,
                           **{self.cache_argument: cache})
                position = end
            for _ in range(_COMPILED_WARMUP_STEPS):
                self.compiled_decode(cache, self.tokens[:, position : position + 1])
                position += 1
        synchronize(self.device)

    def _checkpoint(self, stream: _Stream, length: int) -> dict | None:
        """Bring the context to `length`, then run the decode steps; return the record.

        A point a resumed run already has is not measured again: its decode-step tokens
        are fed as one chunk, so the context that follows is the same text.
        """
        config = self.config
        while stream.position < length:
            self._forward(stream, stream.position, min(stream.position + config.chunk, length), "prefill")
        if (stream.spec.name, length) in self.finished.points:
            self._forward(stream, length, length + config.decode_steps, "prefill")
            return None
        step_times = []
        ttft_s = attn_s = None
        for step in range(config.decode_steps):
            start = stream.position
            if step == config.decode_steps - 1:
                with AttentionTimer(self.model, self.device) as timer:  # eager: it times inside the model
                    self._forward(stream, start, start + 1, "decode")
                attn_s = timer.total_s
            else:
                build_before = stream.build_s
                # The first token (TTFT) is the prompt's; the compiled step times the ones after.
                elapsed = self._forward(stream, start, start + 1, "decode", compiled=step > 0)
                if step == 0:
                    ttft_s = build_before + elapsed
                else:
                    step_times.append(elapsed * 1000)
        tpot_median = statistics.median(step_times)
        peak = self.sampler.peak_record()
        cache = stream.cache
        perplexity = nll_mean = None
        if stream.nll_count:
            nll_mean = stream.nll_sum / stream.nll_count
            perplexity = math.exp(nll_mean)
        return {
            "method": stream.spec.name,
            "length": length,
            "status": "ok",
            "batch_size": config.batch_size,
            "ttft_s": ttft_s,
            "tpot_ms_median": tpot_median,
            "tpot_ms_p90": percentile(step_times, 0.9),
            "throughput_tok_s": config.batch_size * 1000.0 / tpot_median,
            "attn_ms_mean": attn_s * 1000,
            **peak,
            "cache_bytes": cache_bytes(cache),
            "cache_tokens": cached_tokens(cache),
            "nll_mean": nll_mean,
            "perplexity": perplexity,
            "tokens_scored": stream.nll_count or None,
            "error": None,
        }

    def run_method(self, spec: MethodSpec, lengths: tuple[int, ...]) -> list[dict]:
        """Measure `spec` at each of `lengths`; returns the records written (an OOM ends it early)."""
        if self.finished.covers(spec.name, lengths):
            return []
        self._free()
        self._samples: list[dict] = []
        stream, records, failure, heading_for = None, [], None, lengths[0]
        try:
            # Inside the try: a warm-up that runs out of memory is a result like any other.
            stream = self._start_stream(spec)
            self.sampler.reset_peak()
            for length in lengths:
                heading_for = length
                record = self._checkpoint(stream, length)
                self._flush_samples()
                if record is not None:
                    records.append(self.writer.add_record(record))
        except torch.OutOfMemoryError as error:
            # Keep only the message: the exception's frames hold the cache and activations alive.
            failure = str(error).splitlines()[0] if str(error) else "out of memory"
        finally:
            self._flush_samples()
        if failure is not None:
            tokens_seen = stream.position if stream is not None else 0
            stream = None
            self._free()
            self.writer.add_event({"method": spec.name, "type": "oom", "length": heading_for,
                                   "tokens_seen": tokens_seen, "message": failure})
            records.append(self.writer.add_record(self._failed_record(spec, heading_for, failure)))
        return records

    def _failed_record(self, spec: MethodSpec, length: int, message: str) -> dict:
        record = dict.fromkeys(RECORD_FIELDS, None)
        record.update(method=spec.name, length=length, status="oom", batch_size=self.config.batch_size, error=message)
        return record

    def _flush_samples(self) -> None:
        if self._samples:
            self.writer.add_samples(self._samples)
            self._samples = []

    def _free(self) -> None:
        free_memory(self.device)

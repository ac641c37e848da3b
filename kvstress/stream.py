"""The measured stream: the one place where text goes through the model under a cache and is measured.

    Harness   what every method of a run shares: the model, the results writer, memory
              sampling and the --max-memory budget, progress, the stop check (Ctrl-C, SIGTERM), warm-up,
              the compiled decode step (--compile) and the one guard (OOM or any error
              ends the method as a failed point, never the run)
    Stream    one method's cache and its position in the text. Every forward of every
              command goes through Stream.forward: timed (synchronised on CUDA), memory
              sampled, the budget checked, progress advanced, a stop (Ctrl-C, SIGTERM) polled

A command is a schedule over it (sweep.py, perplexity.py, needle.py, batch.py): which
tokens to feed, when to open a stream, what to write. The shape of every schedule:

    with harness.guard(spec, length=L) as point:   # an OOM or error inside → one "oom" or
        stream = harness.open(spec, tokens)        # "error" event and one failed record
        ...stream.feed(end, "prefill")...          # (point.failed); the method ends there,
                                                   # the next one runs
        writer.add_record({... **harness.measurements(stream, step_ms)})
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .caches import CompressedCache, UnsupportedModelError, cache_sizes, cached_tokens, make_run_cache
from .caches.compiled import CompiledDecode
from .caches.hooks import attention_modules
from .config import RunConfig
from .control import Progress
from .errors import KvstressError, RankLost, RunInterrupted, StopNow, describe_failure, failure_site, first_line  # noqa: F401 - StopNow: tests read it from here
from .memory import MemoryBudget, MemorySampler
from .models import cache_argument
from .results import RECORD_FIELDS, UNSTABLE_LOAD, UNSTABLE_SPREAD, ResultsError
from .spec import MethodSpec

# Tokens of the warm-up stream run before each method is measured.
_WARMUP_TOKENS = 64
# Decode steps a compiled step needs before it is measured: compilation, then on CUDA
# a warm-up run and the graph recording.
_COMPILED_WARMUP_STEPS = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def free_memory(device: torch.device) -> None:
    """Between streams (never between steps: a growing cache would then reallocate every step).

    On CPU the freed heap goes back to the OS (glibc's malloc_trim), so that one stream's
    peak RSS does not include what the allocator kept from a bigger one before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may carry over between streams (cache_bytes is exact)


def timing_stats(step_ms: list[float]) -> dict:
    """Median and p90 of the timed steps, and their spread; None when nothing was timed."""
    if not step_ms:
        return {"tpot_ms_median": None, "tpot_ms_p90": None, "tpot_spread": None}
    median, p90 = statistics.median(step_ms), percentile(step_ms, 0.9)
    return {"tpot_ms_median": median, "tpot_ms_p90": p90, "tpot_spread": p90 / median if median > 0 else None}


class AttentionTimer:
    """Wall time spent inside the attention modules during one forward (synchronised on CUDA)."""

    def __init__(self, model, device: torch.device):
        self.modules = attention_modules(model)
        self.device = device
        self.total_s = 0.0
        self._started = 0.0
        self._handles = []

    def __enter__(self) -> AttentionTimer:
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


class Stream:
    """One method's cache and how far into its text it is."""

    def __init__(self, harness: Harness, spec: MethodSpec, cache, tokens: torch.Tensor):
        self.harness = harness
        self.spec = spec
        self.cache = cache
        self.tokens = tokens  # [batch, n] teacher-forcing text on the model's device
        self.position = 0  # tokens fed since the stream (or its prompt) started
        self.forwards = 0  # every forward of the stream, prompts included
        self.build_s = 0.0  # forward time spent building the context so far

    def feed(self, end: int, phase: str, **options) -> tuple[torch.Tensor, float]:
        """Feed the text's tokens [position, end); see forward()."""
        return self.forward(self.tokens[:, self.position : end], phase, **options)

    def forward(self, ids: torch.Tensor, phase: str, *, logits_to_keep: int = 1,
                compiled: bool = False) -> tuple[torch.Tensor, float]:
        """One measured forward of ids [batch, q]: (logits, seconds).

        compiled: a single-token step goes through --compile's compiled step (which runs
        eagerly where the cache is not in steady state; its logits are the last position's).
        With --tp, every rank agrees on the time (the slowest rank's) and on faults (distributed.py).
        """
        ranks = self.harness.ranks
        if ranks is None:
            return self._forward(ids, phase, logits_to_keep=logits_to_keep, compiled=compiled)
        # Every rank at once: the slowest rank's time; a fault on one rank is everyone's.
        logits, elapsed, slowest = ranks.together(
            f"a forward of {self.spec.name}",
            lambda: self._forward(ids, phase, logits_to_keep=logits_to_keep, compiled=compiled),
            lambda: f"stopped by the user at {self.position} tokens of {self.spec.name}")
        self.build_s += slowest - elapsed
        return logits, slowest

    def _forward(self, ids: torch.Tensor, phase: str, *, logits_to_keep: int = 1,
                 compiled: bool = False) -> tuple[torch.Tensor, float]:
        harness = self.harness
        synchronize(harness.device)
        began = time.perf_counter()
        with torch.no_grad():
            if compiled and harness.compiled_decode is not None and ids.shape[1] == 1:
                logits = harness.compiled_decode(self.cache, ids)
            else:
                logits = harness.model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep,
                                       **{harness.cache_argument: self.cache}).logits
        synchronize(harness.device)
        elapsed = time.perf_counter() - began
        self.position += ids.shape[1]
        self.forwards += 1
        self.build_s += elapsed
        harness.after_forward(self, ids.shape[1], phase)
        return logits, elapsed

    def restart(self) -> None:
        """An empty cache for a new prompt (needle): a compressed cache keeps its buffers, so a
        compiled step stays valid; the full cache is made anew."""
        if isinstance(self.cache, CompressedCache):
            self.cache.reset()
        else:
            self.cache = None
            self.cache = self.harness.new_cache(self.spec)
        self.position = 0
        self.build_s = 0.0


@dataclass
class Point:
    """What the guard knows: the point the stream is heading for, and the failed record if it failed."""

    length: int
    batch_size: int
    failed: dict | None = None


class Harness:
    """Runs streams for one run: shared by every method, and by every point of a method."""

    def __init__(self, config: RunConfig, model, writer, *, pretrained: bool = True,
                 progress: Progress | None = None, stop_requested: Callable[[], bool] = lambda: False,
                 ranks=None):
        """pretrained: real weights, so that a negative log-likelihood means something.
        ranks: with --tp, this process's rank (distributed.Ranks, which run.execute starts)."""
        self.config = config
        self.model = model
        self.writer = writer
        self.pretrained = pretrained
        self.progress = progress or Progress()
        self.stop_requested = stop_requested
        self.device = next(model.parameters()).device
        self.cache_argument = cache_argument(model)
        self.sampler = MemorySampler(self.device)
        self.ranks = ranks  # --tp: this process's rank (distributed.py)
        self.budget = None
        if config.max_memory is not None:
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) if self.ranks is None else \
                self.ranks.weight_bytes(model)  # with --tp, the budget is per rank
            self.budget = MemoryBudget(config.max_memory, base_bytes=weights)
        self.compiled_decode = CompiledDecode(model, self.cache_argument) if config.compile else None
        self.current: Stream | None = None
        self._samples: list[dict] = []
        self._load_peak: float | None = None
        self._started = time.perf_counter()

    # -- streams -------------------------------------------------------------------

    def new_cache(self, spec: MethodSpec):
        # The chunk room is the run's prefill chunk whatever the length, so that a compressed
        # cache's bytes are the same at every point of the run.
        return make_run_cache(spec, self.model, positions=self.config.positions, lazy=self.config.lazy,
                              seed=self.config.seed, chunk=self.config.chunk)

    def check_methods(self, specs) -> None:
        """Refuse, before anything is measured, a method this model cannot run (a KvstressError:
        exit 2), such as a policy the model's attention does not support, sizes that do not
        fit its layers, or --compile where no step could be the compiled one. Any other error
        building a cache is the method's own failure, recorded when it runs (guard)."""
        for spec in specs:
            try:
                cache = self.new_cache(spec)
            except KvstressError:
                raise
            except Exception:
                continue
            why = CompiledDecode.eager_because(cache) if self.compiled_decode is not None and spec.is_compressed else None
            if why:
                raise UnsupportedModelError(f"{spec.name} on this model: {why}, but a compiled step needs fixed "
                                            "shapes: drop --compile")

    def open(self, spec: MethodSpec, tokens: torch.Tensor) -> Stream:
        """A new stream over tokens [batch, n], after a warm-up on them, in a new measuring window."""
        self.current = None
        free_memory(self.device)
        tokens = tokens.to(self.device)
        cache = self.new_cache(spec)
        if self.compiled_decode is not None and spec.is_compressed:
            # Warm up (compile, record CUDA graphs) on the stream's own cache, then empty it:
            # its buffers keep the shapes and addresses the compiled step was made for.
            self._warm_up_compiled(cache, tokens)
            cache.reset()
        else:
            self._warm_up(self.new_cache(spec), tokens)
        self.new_window()
        self.current = Stream(self, spec, cache, tokens)
        return self.current

    def _warm_up(self, cache, tokens: torch.Tensor) -> None:
        """A short unmeasured stream, so that the first measured forward pays no one-off start-up costs."""
        prefill = max(1, min(_WARMUP_TOKENS, tokens.shape[1] - 2))

        def forward(ids: torch.Tensor) -> None:
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_argument: cache})
            synchronize(self.device)

        for ids in [tokens[:, :prefill]] + [tokens[:, t : t + 1] for t in range(prefill, min(prefill + 2, tokens.shape[1]))]:
            if self.ranks is None:
                forward(ids)
            else:  # out of memory on one rank is every rank's, here as in every measured forward
                self.ranks.together("a warm-up forward", lambda ids=ids: (forward(ids), 0.0))

    def _warm_up_compiled(self, cache, tokens: torch.Tensor) -> None:
        """Fill the cache in chunks until decode steps compile, then run a few."""
        available = tokens.shape[1] - _COMPILED_WARMUP_STEPS
        position = 0
        with torch.no_grad():
            while not CompiledDecode.compiles(cache, tokens[:, :1]) and position < available:
                end = min(position + self.config.chunk, available)
                self.model(input_ids=tokens[:, position:end], use_cache=True, logits_to_keep=1,
                           **{self.cache_argument: cache})
                position = end
            for _ in range(_COMPILED_WARMUP_STEPS):
                self.compiled_decode(cache, tokens[:, position : position + 1])
                position += 1
        synchronize(self.device)

    # -- every forward ---------------------------------------------------------------

    def after_forward(self, stream: Stream, count: int, phase: str) -> None:
        sample = self.sampler.sample(*cache_sizes(stream.cache))
        self._samples.append({"method": stream.spec.name, "step": stream.forwards,
                              "tokens_seen": stream.position, "phase": phase,
                              "elapsed_s": time.perf_counter() - self._started, **sample})
        if hasattr(os, "getloadavg"):
            load = os.getloadavg()[0]
            self._load_peak = load if self._load_peak is None else max(self._load_peak, load)
        if self.budget is not None:
            self.budget.check(sample)
        self.progress.advance(count)
        if self.stop_requested():
            raise RunInterrupted(f"stopped by the user at {stream.position} tokens of {stream.spec.name}",
                                 getattr(self.stop_requested, "signum", None))

    def flush_samples(self) -> None:
        if self._samples:
            self.writer.add_samples(self._samples)
            self._samples = []

    # -- measuring windows -------------------------------------------------------------

    def new_window(self) -> None:
        """Start the peaks (memory, load) that the next record reports."""
        self.sampler.reset_peak()
        self._load_peak = None

    def measurements(self, stream: Stream, step_ms: list[float]) -> dict:
        """The record fields every command measures the same way: timing and how stable it
        was (load since the last record), peak memory since new_window(), the cache's size now."""
        timing = timing_stats(step_ms)
        load = self._load_peak / (os.cpu_count() or 1) if self._load_peak is not None else None
        self._load_peak = None  # the next record's load is its own point's
        unstable = None
        if timing["tpot_spread"] is not None:
            unstable = timing["tpot_spread"] > UNSTABLE_SPREAD or (load is not None and self._others_load(load) > UNSTABLE_LOAD)
        held, allocated = cache_sizes(stream.cache)
        measured = {**timing, "load_per_core": load, "timing_unstable": unstable, **self.sampler.peak_record(),
                    "cache_bytes": held, "cache_allocated_bytes": allocated, "cache_tokens": cached_tokens(stream.cache)}
        # --tp: memory summed over the ranks, each rank's own in a "ranks" event (distributed.py)
        return measured if self.ranks is None else self.ranks.combine(stream, measured, self.writer)

    def _others_load(self, load_per_core: float) -> float:
        """The load per core that is not this run's: on CPU torch's intra-op threads are busy,
        on a GPU one thread launches the kernels."""
        own = torch.get_num_threads() if self.device.type == "cpu" else 1
        return load_per_core - own / (os.cpu_count() or 1)

    # -- the one guard ----------------------------------------------------------------------

    @contextmanager
    def guard(self, spec: MethodSpec, *, length: int, batch_size: int = 1) -> Iterator[Point]:
        """Runs the body; what ends a method's stream early becomes one event and one failed
        record at point.length (set it as the stream heads for each point), the stream is
        released, and the method ends there while the run goes on:

            oom     a real OOM (on CPU: the allocator refusing a size), or the --max-memory
                    budget: a measurement of the method
            error   any other exception in its stream, a plugin policy's included: the error's
                    first line and where it was raised (--debug also prints the traceback)

        A stop (Ctrl-C, SIGTERM), a results file that cannot be written and a lost --tp rank
        are not the method's: they end the run."""
        point = Point(length, batch_size)
        failure: tuple[str, str, str | None] | None = None
        try:
            yield point
        except torch.OutOfMemoryError as error:
            failure = ("oom", first_line(error, "out of memory"), None)
        except (RunInterrupted, ResultsError, RankLost):
            raise
        except Exception as error:
            refused = _host_allocation_refused(error)
            if refused is not None:
                failure = ("oom", refused, None)
            else:
                if self.config.debug:
                    traceback.print_exception(error)
                failure = ("error", describe_failure(error), getattr(error, "where", None) or failure_site(error))
        finally:
            self.flush_samples()
        if failure is not None:  # out of the except clause: the exception's frames, holding the cache, are gone
            self._record_failure(spec, point, *failure)

    def _record_failure(self, spec: MethodSpec, point: Point, status: str, message: str, where: str | None) -> None:
        tokens_seen = self.current.position if self.current is not None else 0
        self.current = None
        free_memory(self.device)
        self.writer.add_event({"method": spec.name, "type": status, "length": point.length,
                               "batch_size": point.batch_size, "tokens_seen": tokens_seen, "message": message,
                               **({"where": where} if where else {})})
        record = dict.fromkeys(RECORD_FIELDS, None)
        record.update(method=spec.name, length=point.length, status=status, batch_size=point.batch_size,
                      error=message if where is None else f"{message} (at {where})")
        point.failed = self.writer.add_record(record)


def _host_allocation_refused(error: Exception) -> str | None:
    """The message of a CPU allocation that the system refused (torch raises a RuntimeError,
    where CUDA raises torch.OutOfMemoryError): the out-of-memory it is, without torch's
    source location; None for any other error."""
    text = str(error)
    start = text.find("DefaultCPUAllocator: can't allocate memory")
    if not isinstance(error, RuntimeError) or start < 0:
        return None
    end = text.find(" bytes", start)
    return text[start : end + len(" bytes")] if end >= 0 else first_line(error)

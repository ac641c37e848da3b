"""Batch-size throughput: how many sequences fit at one context length, and how fast they decode.

    kvstress batch --length 4k --batch-sizes 1,2,4,8 --method baseline --method h2o_4_32_256
    kvstress batch --length 16k --find-max-batch --max-batch 256 --model random:llama-2-7b

A compressed cache saves memory; this turns the saving into tokens per second. For
each method, every sequence of a batch is a different segment of the text (each H2O
sequence evicts its own tokens), all at the same context length. Each (method, batch
size) point is one ordinary sweep stream (sweep.run_checkpoints) with lengths=(length,)
and that batch size: chunked prefill to the length, then the decode steps, whose median
time per step is the TPOT. The record it writes (kind "batch") carries

    batch_size, tpot_ms_median / p90, throughput_tok_s = batch_size * 1000 / TPOT median
    (generated tokens per second over all sequences), peak memory, cache_bytes, and
    status "ok" or "oom" (a real OOM or the --max-memory budget), or "error" when the
    method failed there (it ends without a largest batch; a resumed run measures it again).

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

Memory is freed between points (stream.free_memory at the start of each stream hands
the freed heap back to the OS, so that peak RSS starts from the same floor at every
point). On CPU peak RSS is still the whole process's resident memory (weights,
activations, allocator slack): cache_bytes (the KV cache's own tensors) is the exact
measure there. A resumed run takes the points its file holds as measured, and skips
methods whose largest batch is recorded.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import BatchConfig, ConfigError, parse_batch_sizes  # noqa: F401 - parse_batch_sizes: read from here too
from .events import MAX_BATCH_EVENT, describe_max_batch, largest_batches
from .run import Schedule
from .spec import MethodSpec
from .stream import Harness
from .sweep import run_checkpoints


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


class TextTooShort(ConfigError):
    """The text cannot hold the largest batch of the run."""


class _Failed(Exception):
    """A batch point failed with an error (recorded by the guard): the method ends there."""


class BatchSchedule(Schedule):
    """Measures (method, batch size) points, each one a fresh sweep stream."""

    config_type = BatchConfig
    length_option = "--length"
    config: BatchConfig

    def load_text(self, tokenizer):
        """The text holding config.largest_batch segments; a one-line error naming the largest
        batch the text allows when it is too short (batch sizes are never capped silently)."""
        from .texts import ShortText, load_text

        config = self.config
        try:
            return load_text(config.dataset, tokenizer, config.tokens_needed, book=self.book,
                             length_option=self.length_option)
        except ShortText as error:
            name, available = error.name, error.available
        per_sequence = config.tokens_per_sequence
        allowed = available // per_sequence
        what = "--max-batch" if config.find_max_batch else "the largest --batch-sizes value"
        if allowed == 0:
            fix = "use a shorter --length or a longer text"
        else:
            fix = f"use --max-batch {allowed} or smaller --batch-sizes, a shorter --length, or a longer text"
        raise TextTooShort(
            f"{name} has only {available} tokens but {what} {config.largest_batch} needs {config.largest_batch} × "
            f"{per_sequence} = {config.tokens_needed} (each sequence a different segment of --length {config.length} "
            f"plus {config.decode_steps + 1} decode tokens); the text allows batches up to {allowed}: {fix}"
        ) from None

    def prepare(self, text, writer) -> None:
        config = self.config
        self.text_tokens = text.tokens
        plan = (f"find the largest batch up to {config.search_limit} (doubling, then binary search)"
                if config.find_max_batch else f"batch sizes {', '.join(map(str, config.sweep_sizes))}, until OOM")
        self.notify(f"plan: {plan}, {config.length}-token context, each sequence a different text segment")

    def is_done(self, spec: MethodSpec, writer) -> bool:
        return spec.name in largest_batches(writer.events)

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        return {"length": self.config.length, "batch_size": None}

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        config = self.config

        def fits(batch_size: int) -> bool:
            status = self.measure(harness, spec, batch_size)["status"]
            if status == "error":  # not a limit of memory: the search has no answer
                raise _Failed
            return status == "ok"

        try:
            if config.find_max_batch:
                best, first_oom, probes = find_max_batch(fits, config.search_limit)
                limited_by = "--max-batch" if config.max_batch is not None else "--batch-sizes"
            else:
                probes, best, first_oom = [], None, None
                for batch_size in config.sweep_sizes:
                    probes.append(batch_size)
                    if not fits(batch_size):
                        first_oom = batch_size
                        break
                    best = batch_size
                limited_by = ("--max-batch" if config.max_batch is not None and config.max_batch < config.batch_sizes[-1]
                              else "--batch-sizes")
        except _Failed:
            return  # the failed point is recorded; no largest batch (a resumed run measures it again)
        event = harness.writer.add_event({
            "type": MAX_BATCH_EVENT, "method": spec.name, "batch_size": best, "first_oom": first_oom,
            "limited_by": "oom" if first_oom is not None else limited_by,
            "search": "find-max-batch" if config.find_max_batch else "sweep", "probes": list(probes),
            "length": config.length,
        })
        self.notify(describe_max_batch(event))

    def measure(self, harness: Harness, spec: MethodSpec, batch_size: int) -> dict:
        """One point's record (status ok or oom): measured now, or the one a resumed file holds."""
        from .texts import text_segments

        for record in harness.writer.records:
            if (record["method"], record["batch_size"], record["status"]) in ((spec.name, batch_size, "ok"),
                                                                            (spec.name, batch_size, "oom")):
                return record
        config = self.config.point_config(batch_size)
        tokens = text_segments(self.text_tokens, batch_size, config.tokens_needed, self.length_option)
        harness.progress.start(f"{spec.name} × {batch_size}", config.tokens_needed - 1)
        record = run_checkpoints(harness, spec, tokens, config)[-1]
        harness.progress.finish()
        if record["status"] == "ok":
            self.notify(f"{spec.name} batch {batch_size}: {record['throughput_tok_s']:.1f} tok/s "
                        f"(TPOT {record['tpot_ms_median']:.2f} ms)")
        return record



"""`kvstress sweep`: stream ever-longer text through each cache and measure it at each checkpoint.

For each method, one stream of the text:

    prefill chunks ──► checkpoint L ──► decode steps (teacher-forced) ──► prefill chunks ──► ...
                                         step 0        TTFT(L) = time to build the context + this step
                                         steps 1..k-2  TPOT samples (median, p90)
                                         step k-1      attention-time probe (hooks, excluded from TPOT)

The NLL of every next token is accumulated (real weights only) so each checkpoint
also carries the perplexity of the text so far. An out-of-memory error (real, or the
--max-memory budget) ends the method with an "oom" record at the checkpoint it was
heading for; the next method starts clean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SweepConfig
from .run import Schedule
from .spec import MethodSpec
from .stream import AttentionTimer, Harness, Stream

# exp() of a mean NLL above this overflows a float: the perplexity is then not a number.
MAX_NLL = 700.0


def perplexity(nll_mean: float) -> float | None:
    return math.exp(nll_mean) if nll_mean < MAX_NLL else None


class SweepSchedule(Schedule):
    random_weights_note = "random weights: perplexity is not measured (speed and memory are faithful)"

    config_type = SweepConfig
    config: SweepConfig

    def prepare(self, text, writer) -> None:
        from .texts import text_segments

        self.tokens = text_segments(text.tokens, self.config.batch_size, self.config.tokens_needed)

    def is_done(self, spec: MethodSpec, writer) -> bool:
        return spec.name in ended_methods(writer.records) or all(
            length in done_lengths(writer, spec) for length in self.config.lengths)

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        harness.progress.start(spec.name, self.config.tokens_needed - 1)
        run_checkpoints(harness, spec, self.tokens, self.config, done=done_lengths(harness.writer, spec))
        harness.progress.finish()

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        recorded = {r["length"] for r in records if r["method"] == spec.name}
        pending = [length for length in self.config.lengths if length not in recorded]
        return {"length": pending[0], "batch_size": self.config.batch_size} if pending else None


def done_lengths(writer, spec: MethodSpec) -> set[int]:
    """Checkpoints of `spec` a results file already holds (ResultsWriter.done_points)."""
    return {length for method, length in writer.done_points() if method == spec.name}


def ended_methods(records: list[dict]) -> set[str]:
    return {r["method"] for r in records if r["status"] == "oom"}


def run_checkpoints(harness: Harness, spec: MethodSpec, tokens: torch.Tensor, config: SweepConfig, *,
                    done: set[int] = frozenset()) -> list[dict]:
    """Measure `spec` at each of config.lengths on tokens [batch, >= tokens_needed]; returns the
    records written (an OOM ends it early). Checkpoints in `done` are passed through, not measured."""
    records = []
    with harness.guard(spec, length=config.lengths[0], batch_size=config.batch_size) as point:
        stream = harness.open(spec, tokens)
        nll = [0.0, 0]  # sum, count over every scored prediction so far
        for length in config.lengths:
            point.length = length
            record = _checkpoint(harness, stream, config, length, nll, measure=length not in done)
            harness.flush_samples()
            if record is not None:
                records.append(harness.writer.add_record(record))
    if point.failed:
        records.append(point.failed)
    return records


def _checkpoint(harness: Harness, stream: Stream, config: SweepConfig, length: int, nll: list,
                *, measure: bool) -> dict | None:
    """Bring the context to `length`, then run the decode steps; return the record.

    A point a resumed run already has is not measured again: its decode-step tokens are
    fed as one chunk, so the context that follows is the same text.
    """
    # All logits only when they are scored (see DESIGN: logits_to_keep).
    keep = 0 if harness.pretrained else 1

    def feed(end: int, phase: str, **options) -> float:
        start = stream.position
        logits, elapsed = stream.feed(end, phase, logits_to_keep=keep, **options)
        if harness.pretrained:
            # Position i predicts token i + 1; the text holds one token past the last forward.
            targets = stream.tokens[:, start + 1 : end + 1]
            nll[0] += F.cross_entropy(logits[:, : targets.shape[1]].float().transpose(1, 2), targets,
                                      reduction="sum").item()
            nll[1] += targets.numel()
        return elapsed

    while stream.position < length:
        feed(min(stream.position + config.chunk, length), "prefill")
    if not measure:
        feed(length + config.decode_steps, "prefill")
        return None
    step_ms = []
    ttft_s = attn_s = None
    for step in range(config.decode_steps):
        end = stream.position + 1
        if step == config.decode_steps - 1:
            with AttentionTimer(harness.model, harness.device) as timer:  # eager: it times inside the model
                feed(end, "decode")
            attn_s = timer.total_s
        else:
            build_before = stream.build_s
            # The first token (TTFT) is the prompt's; the compiled step times the ones after.
            elapsed = feed(end, "decode", compiled=step > 0)
            if step == 0:
                ttft_s = build_before + elapsed
            else:
                step_ms.append(elapsed * 1000)
    measured = harness.measurements(stream, step_ms)
    nll_mean = nll[0] / nll[1] if nll[1] else None
    return {
        "method": stream.spec.name,
        "length": length,
        "status": "ok",
        "batch_size": config.batch_size,
        "ttft_s": ttft_s,
        **measured,
        "throughput_tok_s": config.batch_size * 1000.0 / measured["tpot_ms_median"],
        "attn_ms_mean": attn_s * 1000,
        "nll_mean": nll_mean,
        "perplexity": perplexity(nll_mean) if nll_mean is not None else None,
        "tokens_scored": nll[1] or None,
    }

"""One decode step, interleaved: H2O and StreamingLLM (eager and compiled) beside transformers'
own caches and the bandwidth floor, same model, one process (issue 15, targets 1, 2 and 4).

What it measures, all as ratios taken in this one run:

  * each compressed cache (one per method) is filled to each context in turn and timed there
    in rounds that alternate between the methods: eager steps, then compiled steps
    (`CompiledDecode`: `torch.compile(mode="reduce-overhead")`, one CUDA graph per step on GPU);
  * at --reference-context the rounds also time the plain `DynamicCache` holding the whole
    context (eager; what a user runs without compression), and, among the compiled steps,
    transformers' `StaticCache` + `torch.compile` holding --static-len tokens (no eviction:
    the fastest step a cache of that size can have);
  * a `DynamicCache` holding `capacity` tokens (eager), the step the issue's first 7B
    measurement used;
  * the bandwidth floor of a step: (weight bytes + the KV bytes a step reads) ÷ the copy
    bandwidth of a 1 GiB tensor (bytes read + written per second).

    python benchmarks/reference_step.py --out gpu-results/reference.json      # GPU: random:llama-2-7b, bf16
    python benchmarks/reference_step.py --device cpu --model tiny-random --dtype float32 \\
        --contexts 256,512 --reference-context 512 --capacity 64 --chunk 64 --rounds 2 --steps 3 --out /tmp/ref.json

The results file (its own small format, "kvstress-reference-step") holds every row, the
environment (card, driver, versions) and the compile statistics (graphs, CUDA graph replays,
"skipping cudagraphs" count); `benchmarks/gpu_table.py` reads it beside the sweep's files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from targets import memory_bandwidth  # the sibling script (benchmarks/ is on sys.path when run)
from torch._dynamo.utils import counters

from kvstress import make_cache
from kvstress.caches import cache_bytes, cached_tokens
from kvstress.caches.compiled import CompiledDecode
from kvstress.models import cache_argument, load_model
from kvstress.results import environment
from kvstress.stream import synchronize

WARM_UP_STEPS = 3  # untimed steps before each timed series: compilation, CUDA graph warm-up and recording


class Timed:
    """One cache being timed: how to take a step on it, where its text has got to, its step times."""

    def __init__(self, name: str, cache, step, position: int, kv_tokens_read):
        self.name, self.cache, self.step, self.position = name, cache, step, position
        self.kv_tokens_read = kv_tokens_read  # () -> tokens whose K/V a step reads
        self.times: list[float] = []

    def run(self, ids: torch.Tensor, device: torch.device, timed: bool) -> None:
        token = ids[:, self.position : self.position + 1]
        synchronize(device)
        began = time.perf_counter()
        self.step(self.cache, token)
        synchronize(device)
        if timed:
            self.times.append((time.perf_counter() - began) * 1000)
        self.position += 1


def interleave(series: list[Timed], ids, device, rounds: int, steps: int) -> None:
    """Warm each up, then `rounds` rounds of `steps` steps per cache, taking turns."""
    with torch.no_grad():
        for item in series:
            for _ in range(WARM_UP_STEPS):
                item.run(ids, device, timed=False)
        for _ in range(rounds):
            for item in series:
                for _ in range(steps):
                    item.run(ids, device, timed=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--contexts", default="2048,8192,32768,50000", help="contexts each compressed cache is timed at")
    parser.add_argument("--reference-context", type=int, default=32768, help="the full DynamicCache's context")
    parser.add_argument("--static-len", type=int, default=None, help="StaticCache slots (default: capacity)")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per cache per round")
    parser.add_argument("--no-compile", action="store_true", help="eager steps only")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds this run may take: compiled steps that would not fit are skipped")
    parser.add_argument("--compile-estimate-s", type=float, default=60,
                        help="what compiling one graph is expected to take, against --budget-s")
    parser.add_argument("--out", type=Path, default=Path("reference_step.json"))
    args = parser.parse_args()
    started = time.perf_counter()

    contexts = [int(c) for c in args.contexts.split(",")]
    capacity = args.capacity
    methods = [f"streaming_4_{capacity}", f"h2o_4_{max(1, capacity // 8)}_{capacity}"]
    static_len = args.static_len or capacity
    per_context = 2 * (WARM_UP_STEPS + args.rounds * args.steps)  # text one cache uses at a context
    if any(b - a < per_context for a, b in zip(contexts, contexts[1:])) or contexts != sorted(contexts):
        parser.error(f"--contexts must increase by at least {per_context} tokens")

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model = loaded.model
    device = model.device
    argument = cache_argument(model)
    text_config = model.config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_per_token = 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * element
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = memory_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 27))

    def floor_ms(tokens: int) -> float:
        return (weights + tokens * kv_per_token) / bandwidth * 1000

    length = max(contexts[-1], args.reference_context) + per_context + static_len + 64
    ids = torch.randint(4, 260, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    rows: list[dict] = []
    errors: list[str] = []
    compile_info: dict = {"ran": False}

    def fits(graphs: int) -> bool:
        """Whether compiling `graphs` graphs (and their steps) still fits in --budget-s."""
        if args.budget_s is None:
            return True
        return time.perf_counter() - started + graphs * args.compile_estimate_s + 10 <= args.budget_s

    def save() -> None:
        """Written after every phase, so that a run stopped part-way keeps what it measured."""
        doc.update(rows=rows, errors=errors, compile=compile_info, elapsed_s=time.perf_counter() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    doc = {
        "format": "kvstress-reference-step", "version": 1,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": loaded.name, "model_source": loaded.source,
        "environment": environment(device),
        "weights_bytes": weights, "kv_bytes_per_token": kv_per_token, "copy_bandwidth_bytes_per_s": bandwidth,
        "methods": methods, "complete": False,
    }

    def prefill(cache, start: int, end: int) -> int:
        with torch.no_grad():
            for position in range(start, end, args.chunk):
                model(input_ids=ids[:, position : min(position + args.chunk, end)], use_cache=True,
                      logits_to_keep=1, **{argument: cache})
        return end

    def eager_step(cache, token):
        return model(input_ids=token, use_cache=True, logits_to_keep=1, **{argument: cache}).logits

    def record(item: Timed, context: int, compiled: bool) -> None:
        median = statistics.median(item.times)
        read = int(item.kv_tokens_read())
        rows.append({
            "cache": item.name, "context": context, "compiled": compiled,
            "tpot_ms_median": median, "tpot_ms_p90": sorted(item.times)[int(0.9 * (len(item.times) - 1))],
            "steps": len(item.times), "cache_bytes": int(cache_bytes(item.cache)), "cache_tokens": int(cached_tokens(item.cache)),
            "kv_tokens_read": read, "floor_ms": floor_ms(read), "vs_floor": median / floor_ms(read),
        })
        item.times = []

    # --- the compressed caches, and the plain DynamicCache at the reference context -------------
    compressed = {m: Timed(m, make_cache(m, model), None, 0, None) for m in methods}
    for item in compressed.values():
        item.kv_tokens_read = lambda cache=item.cache: cached_tokens(cache) + 1

    decode = None
    if not args.no_compile:
        decode = CompiledDecode(model, argument)
    replays = {"count": 0}
    if device.type == "cuda":
        replay = torch.cuda.CUDAGraph.replay

        def counted(self, *a, **k):
            replays["count"] += 1
            return replay(self, *a, **k)

        torch.cuda.CUDAGraph.replay = counted
    torch._dynamo.reset()
    counters.clear()
    compile_seconds = 0.0

    for context in contexts:
        for item in compressed.values():
            item.position = prefill(item.cache, item.position, context)
        eager_series = []
        for item in compressed.values():
            item.step = eager_step
            eager_series.append(item)
        if context == args.reference_context:
            dynamic = Timed("DynamicCache (full)", make_cache("baseline", model), eager_step, 0,
                            lambda: None)
            dynamic.position = prefill(dynamic.cache, 0, context)
            dynamic.kv_tokens_read = lambda cache=dynamic.cache: cached_tokens(cache) + 1
            eager_series.append(dynamic)
        interleave(eager_series, ids, device, args.rounds, args.steps)
        for item in eager_series:
            record(item, context, compiled=False)
        save()
        if context == args.reference_context:
            del dynamic, eager_series
            if device.type == "cuda":
                torch.cuda.empty_cache()

        if decode is None:
            continue
        if not compile_info["ran"] and not fits(len(methods)):
            errors.append(f"compiled steps skipped from {context} on: {len(methods)} compiles would not fit "
                          f"in the {args.budget_s:.0f} s budget")
            decode = None
            continue
        compiled_series = []
        for item in compressed.values():
            if not CompiledDecode.compiles(item.cache, ids[:, :1]):
                errors.append(f"{item.name} at {context}: not a steady-state cache, the compiled step would run eager")
            item.step = decode
            compiled_series.append(item)
        began = time.perf_counter()
        try:
            interleave(compiled_series, ids, device, args.rounds, args.steps)
        except Exception as error:  # a compile failure is a finding, not the end of the run
            errors.append(f"compiled compressed step at {context}: {type(error).__name__}: {error}")
            traceback.print_exc()
            decode = None
            continue
        compile_seconds += time.perf_counter() - began
        for item in compiled_series:
            record(item, context, compiled=True)
        compile_info.update(ran=True)
        save()

    # --- transformers' own StaticCache + torch.compile, and a small DynamicCache ---------------------
    small = Timed(f"DynamicCache ({capacity} tokens)", make_cache("baseline", model), eager_step, 0, None)
    small.position = prefill(small.cache, 0, capacity)
    small.kv_tokens_read = lambda cache=small.cache: cached_tokens(cache) + 1
    interleave([small], ids, device, args.rounds, args.steps)
    record(small, capacity, compiled=False)
    del small

    save()
    if decode is not None and not fits(1):
        errors.append(f"StaticCache + torch.compile skipped: a compile would not fit in the {args.budget_s:.0f} s budget")
    elif decode is not None:
        from transformers import StaticCache

        slots = static_len + WARM_UP_STEPS + args.rounds * args.steps
        mode = "reduce-overhead" if device.type == "cuda" else "default"

        def static_forward(token, cache):
            return model(input_ids=token, use_cache=True, logits_to_keep=1, **{argument: cache}).logits

        compiled_static = torch.compile(static_forward, mode=mode, dynamic=False)

        def static_step(cache, token):
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            return compiled_static(token, cache)

        try:
            cache = StaticCache(config=model.config, max_cache_len=slots)
            static = Timed(f"StaticCache ({static_len} tokens) + compile", cache, static_step, 0,
                           lambda: slots)  # a static step attends over every slot, masked
            static.position = prefill(cache, 0, static_len)
            began = time.perf_counter()
            interleave([static], ids, device, args.rounds, args.steps)
            compile_info["static_compile_and_run_s"] = time.perf_counter() - began
            record(static, static_len, compiled=True)
        except Exception as error:
            errors.append(f"StaticCache + torch.compile: {type(error).__name__}: {error}")
            traceback.print_exc()
    elif not args.no_compile:
        errors.append("StaticCache + torch.compile skipped: the compiled compressed steps did not run")

    compile_info.update(
        compressed_compile_and_run_s=compile_seconds,
        unique_graphs=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
        cudagraph_skips=counters["inductor"]["cudagraph_skips"],
        cuda_graph_replays=replays["count"] if device.type == "cuda" else None,
    )
    doc["complete"] = True
    save()

    print(f"\n{loaded.name} on {device} ({doc['environment'].get('device_name')}); weights {weights / 1e9:.2f} GB, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, {args.rounds}×{args.steps} steps per cache")
    print(f"{'cache':<34}{'context':>8}{'compiled':>9}{'TPOT p50 (ms)':>15}{'p90':>8}{'floor (ms)':>11}{'÷ floor':>9}")
    for row in rows:
        print(f"{row['cache']:<34}{row['context']:>8}{'yes' if row['compiled'] else 'no':>9}{row['tpot_ms_median']:>15.2f}"
              f"{row['tpot_ms_p90']:>8.2f}{row['floor_ms']:>11.2f}{row['vs_floor']:>9.2f}")
    print(f"compile: {compile_info}")
    for error in errors:
        print(f"error: {error}")
    print(f"results: {args.out} ({doc['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()

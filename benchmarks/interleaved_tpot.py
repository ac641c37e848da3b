"""Decode time per token of several caches, measured interleaved so noise hits all alike.

On a shared machine, methods measured one after the other (as a sweep does) can see
different load. Here every cache is filled to the same context first, then they take
turns: a round of single-token steps each, repeated, and the medians are compared.

    python benchmarks/interleaved_tpot.py                                   # random:smollm2-135m, 2k, CPU
    python benchmarks/interleaved_tpot.py --model random:llama-2-7b --device cuda --context 32768
    python benchmarks/interleaved_tpot.py --model smollm2-135m --compile   # compressed caches' decode compiled
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvstress import make_cache
from kvstress.caches.compiled import CompiledDecode
from kvstress.models import load_model
from kvstress.stream import cache_argument, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--methods", default="streaming_4_256,h2o_4_32_256")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per method per round")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (see kvstress sweep --compile)")
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, device = loaded.model, loaded.model.device
    argument = cache_argument(model)
    steps_total = args.rounds * args.steps
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 250, (1, args.context + 3 + steps_total), generator=generator).to(device)
    methods = [m.strip() for m in args.methods.split(",")]
    caches = {method: make_cache(method, model) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}

    compiled_decode = CompiledDecode(model, argument) if args.compile else None

    def forward(cache, start: int, end: int) -> None:
        if compiled_decode is not None:
            compiled_decode(cache, ids[:, start:end])
        else:
            model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1, **{argument: cache})

    with torch.no_grad():
        for cache in caches.values():
            for start in range(0, args.context, args.chunk):
                forward(cache, start, min(start + args.chunk, args.context))
            for warm_up in range(3):  # untimed: compilation, CUDA graph recording
                forward(cache, args.context + warm_up, args.context + warm_up + 1)
        position = args.context + 3
        for _ in range(args.rounds):
            for method, cache in caches.items():
                for step in range(args.steps):
                    synchronize(device)
                    began = time.perf_counter()
                    forward(cache, position + step, position + step + 1)
                    synchronize(device)
                    times[method].append((time.perf_counter() - began) * 1000)
            position += args.steps

    first = statistics.median(times[methods[0]])
    compiled = f", decode compiled ({compiled_decode.mode})" if compiled_decode is not None else ""
    print(f"{loaded.name} on {device}, context {args.context}, {steps_total} steps per method in {args.rounds} rounds{compiled}")
    print(f"{'method':<20}{'TPOT median (ms)':>18}{'p90':>10}{'× ' + methods[0]:>24}")
    for method, values in times.items():
        median = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"{method:<20}{median:>18.2f}{p90:>10.2f}{median / first:>24.3f}")


if __name__ == "__main__":
    main()

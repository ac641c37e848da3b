"""Decode time per token of several caches, measured interleaved so noise hits all alike.

On a shared machine, methods measured one after the other (as a sweep does) can see
different load. Here every cache is filled to its context first, then they take turns:
a round of single-token steps each, repeated, and the medians are compared. Several
contexts (`--context 2048,32768`) give each method one cache per context, so a
compressed cache's flatness is a ratio measured in one run too.

    python benchmarks/interleaved_tpot.py                                   # random:smollm2-135m, 2k, CPU
    python benchmarks/interleaved_tpot.py --model random:llama-2-7b --device cuda --context 32768
    python benchmarks/interleaved_tpot.py --model smollm2-135m --compile   # compressed caches' decode compiled
    python benchmarks/interleaved_tpot.py --model smollm2-135m --context 2048,32768   # flat in context?
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvstress import make_cache
from kvstress.caches.compiled import CompiledDecode
from kvstress.models import cache_argument, load_model
from kvstress.stream import synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", default="2048", help="context length(s) to fill each cache to, e.g. 2048,32768")
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
    contexts = [int(c) for c in args.context.split(",")]
    ids = torch.randint(4, 250, (1, max(contexts) + 3 + steps_total), generator=generator).to(device)
    methods = [m.strip() for m in args.methods.split(",")]
    runs = [(method, context) for method in methods for context in contexts]  # one cache each
    caches = {run: make_cache(run[0], model) for run in runs}
    times: dict[tuple[str, int], list[float]] = {run: [] for run in runs}

    compiled_decode = CompiledDecode(model, argument) if args.compile else None

    def forward(cache, start: int, end: int) -> None:
        if compiled_decode is not None:
            compiled_decode(cache, ids[:, start:end])
        else:
            model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1, **{argument: cache})

    with torch.no_grad():
        for (_, context), cache in caches.items():
            for start in range(0, context, args.chunk):
                forward(cache, start, min(start + args.chunk, context))
            for warm_up in range(3):  # untimed: compilation, CUDA graph recording
                forward(cache, context + warm_up, context + warm_up + 1)
        for round_index in range(args.rounds):
            for run, cache in caches.items():
                position = run[1] + 3 + round_index * args.steps
                for step in range(args.steps):
                    synchronize(device)
                    began = time.perf_counter()
                    forward(cache, position + step, position + step + 1)
                    synchronize(device)
                    times[run].append((time.perf_counter() - began) * 1000)

    medians = {run: statistics.median(values) for run, values in times.items()}
    compiled = f", decode compiled ({compiled_decode.mode})" if compiled_decode is not None else ""
    print(f"{loaded.name} on {device}, {steps_total} steps per cache in {args.rounds} rounds{compiled}")
    first_method, first_context = runs[0]
    print(f"{'method':<20}{'context':>9}{'TPOT median (ms)':>18}{'p90':>10}{'× ' + first_method:>24}"
          f"{'× itself at ' + str(first_context):>20}")
    for (method, context), values in times.items():
        median = medians[method, context]
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"{method:<20}{context:>9}{median:>18.2f}{p90:>10.2f}{median / medians[runs[0]]:>24.3f}"
              f"{median / medians[method, first_context]:>20.3f}")


if __name__ == "__main__":
    main()

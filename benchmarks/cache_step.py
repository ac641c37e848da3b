"""What one decode step costs inside the cache, without the model around it.

For `--layers` attention layers of a given shape, times the cache's own work per
decode step — write the new token in every layer, (H2O) score it, evict — for
StreamingLLM and H2O at a fixed capacity, against the full cache's `torch.cat` growth
at the same context. The model's projections, MLP and attention are left out, so this
isolates what the policies add. Ratios are measured in one run.

    python benchmarks/cache_step.py                              # CPU, one Llama-2-7B layer
    python benchmarks/cache_step.py --heads 9 --kv-heads 3 --head-dim 64 --layers 30   # SmolLM2-135M
    python benchmarks/cache_step.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvstress.caches.base import HANDOFF
from kvstress.caches.h2o import H2OCache
from kvstress.caches.streaming import StreamingCache
from kvstress.spec import parse_spec

FILL_CHUNK = 1024  # tokens per forward while filling the cache up to the context


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        began = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - began) * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1,
                        help="layers per step (the compressed caches batch their eviction over them)")
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--context", type=int, default=8192, help="tokens already seen when timing starts")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (1, args.kv_heads, 1, args.head_dim)
    query = torch.randn(1, args.heads, 1, args.head_dim, device=device, dtype=dtype)
    new_key = torch.randn(shape, device=device, dtype=dtype)
    new_value = torch.randn(shape, device=device, dtype=dtype)
    kernel_options = {"scaling": args.head_dim**-0.5}

    def forward(cache, query, key, value):
        """Each layer as the model drives it (hooks.py): update(), then what its attention
        kernel is about to get, then the kernel done (the last layer's evicts)."""
        for layer in cache.layers:
            keys, _ = layer.update(key, value)
            HANDOFF.layer = None  # the attention interface picks the layer up
            layer.before_attention(query, keys, None, kernel_options)
            layer.after_attention()

    def compressed(cache_class, spec):
        # Room for the fill's chunks, so that the timed steps never reallocate.
        cache = cache_class(parse_spec(spec), num_layers=args.layers, rotary_embedding=None, chunk=FILL_CHUNK)

        # Fill to the context length in large chunks (not timed).
        for start in range(0, args.context, FILL_CHUNK):
            n = min(FILL_CHUNK, args.context - start)
            forward(cache, torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype),
                    torch.randn(1, args.kv_heads, n, args.head_dim, device=device, dtype=dtype),
                    torch.randn(1, args.kv_heads, n, args.head_dim, device=device, dtype=dtype))
        return lambda: forward(cache, query, new_key, new_value)

    def full():
        cache = DynamicCache()
        for index in range(args.layers):
            cache.update(torch.randn(1, args.kv_heads, args.context, args.head_dim, device=device, dtype=dtype),
                         torch.randn(1, args.kv_heads, args.context, args.head_dim, device=device, dtype=dtype), index)

        def step():
            for index in range(args.layers):
                cache.update(new_key, new_value, index)
        return step

    capacity = args.capacity
    cases = {
        "baseline (torch.cat)": full(),
        f"streaming_4_{capacity}": compressed(StreamingCache, f"streaming_4_{capacity}"),
        f"h2o_4_{capacity // 8}_{capacity}": compressed(H2OCache, f"h2o_4_{capacity // 8}_{capacity}"),
    }
    results = {name: statistics.median(time_steps(step, device, 20, args.steps)) for name, step in cases.items()}
    base = results["baseline (torch.cat)"]
    print(f"{args.layers} layers, {args.kv_heads} KV heads × {args.head_dim}, {args.dtype} on {args.device}, "
          f"context {args.context}, capacity {capacity}, median of {args.steps} steps")
    print(f"{'cache':<24}{'µs/step':>10}{'× baseline':>12}")
    for name, value in results.items():
        print(f"{name:<24}{value:>10.1f}{value / base:>12.2f}")


if __name__ == "__main__":
    main()

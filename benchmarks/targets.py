"""The fast-eviction targets (issue 6), measured as ratios in one run.

Streams one text through the full cache, StreamingLLM and H2O at the same capacity
with kvstress's own sweep (chunked prefill, timed single-token steps at each
checkpoint), then prints each target with its measured value:

  1. H2O TPOT ≤ 1.05 × StreamingLLM TPOT at 8k and 32k
  2. compressed TPOT at the longest length ≤ 1.05 × at the shortest, peak memory within 1 %
  3. compressed TPOT ≤ full-cache TPOT at every length ≥ 2 × capacity
  4. (CUDA) H2O decode step ≤ 1.4 × its bandwidth floor: (weights + cache bytes) ÷ memory bandwidth (a large copy)
  5. H2O TTFT at 32k ≤ 1.2 × the full cache's; prefill memory bounded (H2O peak at 32k ≈ at 8k)

    python benchmarks/targets.py                                  # GPU: random:llama-2-7b, bf16
    python benchmarks/targets.py --compile                        # decode steps compiled (CUDA graphs)
    python benchmarks/targets.py --device cpu --model random:smollm2-135m --lengths 2k,8k,16k

Results go to a kvstress results file (--out) as well; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvstress.config import SweepConfig, parse_lengths
from kvstress.models import load_model
from kvstress.results import environment
from kvstress.run import execute
from kvstress.spec import parse_spec
from kvstress.stream import synchronize
from kvstress.sweep import SweepSchedule


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second the device moves, from a large copy (which reads and writes nbytes each)."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    began = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return repeats * 2 * nbytes / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--lengths", default="2k,8k,32k,50000")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=34)
    parser.add_argument("--dataset", default="shakespeare")
    parser.add_argument("--compile", action="store_true",
                        help="compressed caches' decode step compiled (kvstress sweep --compile)")
    parser.add_argument("--out", type=Path, default=Path("targets.json"))
    args = parser.parse_args()

    capacity = args.capacity
    streaming, h2o = f"streaming_4_{capacity}", f"h2o_4_{capacity // 8}_{capacity}"
    config = SweepConfig(
        methods=(parse_spec("baseline"), parse_spec(streaming), parse_spec(h2o)),
        lengths=parse_lengths(args.lengths), model=args.model, dataset=args.dataset, chunk=args.chunk,
        decode_steps=args.decode_steps, device=args.device, dtype=args.dtype, compile=args.compile, out=args.out,
        force=True,
    )
    loaded = load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    device = loaded.model.device
    result = execute(SweepSchedule(config, notify=print), loaded=loaded)
    by = {(record["method"], record["length"]): record for record in result.records}

    def tpot(method, length):
        record = by.get((method, length))
        return record["tpot_ms_median"] if record and record["status"] == "ok" else None

    def memory(method, length):
        record = by.get((method, length))
        if not record or record["status"] != "ok":
            return None
        return record["peak_allocated_bytes"] or record["peak_rss_bytes"]

    rows = []
    lengths = config.lengths

    def ratio(a, b):
        return None if a is None or b is None else a / b

    for length in (n for n in lengths if n in (8192, 32768)):
        rows.append((f"1. H2O / StreamingLLM TPOT at {length}", ratio(tpot(h2o, length), tpot(streaming, length)), "≤ 1.05"))
    first, last = lengths[0], lengths[-1]
    for method in (streaming, h2o):
        rows.append((f"2. {method} TPOT {last} / {first}", ratio(tpot(method, last), tpot(method, first)), "≤ 1.05"))
        rows.append((f"2. {method} peak memory {last} / {first}", ratio(memory(method, last), memory(method, first)), "≤ 1.01"))
    for length in (n for n in lengths if n >= 2 * capacity):
        for method in (streaming, h2o):
            rows.append((f"3. {method} / full TPOT at {length}", ratio(tpot(method, length), tpot("baseline", length)), "≤ 1.00"))
    if device.type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        cache = by[(h2o, last)]["cache_bytes"] if (h2o, last) in by else 0
        floor_ms = (weights + cache) / memory_bandwidth(device) * 1000
        rows.append((f"4. H2O TPOT at {last} / bandwidth floor ({floor_ms:.2f} ms)", ratio(tpot(h2o, last), floor_ms), "≤ 1.40"))
    long = max((n for n in lengths if n <= 32768), default=last)
    ttft = {m: by.get((m, long), {}).get("ttft_s") for m in ("baseline", h2o)}
    rows.append((f"5. H2O / full TTFT at {long}", ratio(ttft[h2o], ttft["baseline"]), "≤ 1.20"))
    rows.append((f"5. H2O peak memory {long} / {lengths[0]}", ratio(memory(h2o, long), memory(h2o, lengths[0])), "≈ 1.00"))

    compiled = ", compressed decode compiled" if args.compile else ", eager"
    print(f"\n{loaded.name} on {device} ({environment(device).get('device_name')}), capacity {capacity}{compiled}")
    print(f"{'target':<58}{'measured':>10}  goal")
    for name, value, goal in rows:
        shown = "–" if value is None else f"{value:.3f}"
        print(f"{name:<58}{shown:>10}  {goal}")


if __name__ == "__main__":
    main()

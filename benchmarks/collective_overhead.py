"""What noting the model's collectives costs under --tp (kvstress/collectives.py).

    python benchmarks/collective_overhead.py

Two measurements in one process:
  wrapper    the wrapper around a collective that does nothing, 100,000 calls, recording
             and not recording: the Python cost alone
  all-reduce one gloo all-reduce of a [1, 1, 64] tensor in a single-rank group, rounds of
             3,000 calls, plain and noted interleaved: the cost against a real collective
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from kvstress import collectives


def wrapper_us(log: collectives.CollectiveLog, recording: bool, calls: int = 100_000) -> float:
    collectives._FUNCTIONS["nothing"] = (None, "nothing", ("op",))
    noted = collectives._noted("nothing", lambda tensor, *args, **kwargs: tensor)
    tensor = torch.zeros(1, 1, 64)
    log.begin()
    log.recording = recording
    began = time.perf_counter()
    for _ in range(calls):
        noted(tensor, group=None)
    elapsed = time.perf_counter() - began
    log.end()
    return elapsed / calls * 1e6


def all_reduce_us(log: collectives.CollectiveLog, recording: bool, calls: int = 3_000) -> float:
    tensor = torch.zeros(1, 1, 64)
    if recording:
        log.begin()
    began = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(tensor)
    elapsed = time.perf_counter() - began
    log.end()
    return elapsed / calls * 1e6


def main() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    log = collectives.watch(dist.distributed_c10d._get_default_store(), 0, 1, 60.0)
    print(f"wrapper: {wrapper_us(log, True):.2f} µs noted, {wrapper_us(log, False):.2f} µs not recording")
    for _ in range(3):  # warm-up
        all_reduce_us(log, False), all_reduce_us(log, True)
    plain, noted = [], []
    for _ in range(15):
        plain.append(all_reduce_us(log, False))
        noted.append(all_reduce_us(log, True))
    print(f"gloo all-reduce: fastest round {min(plain):.1f} µs plain, {min(noted):.1f} µs noted; "
          f"median {statistics.median(plain):.1f} and {statistics.median(noted):.1f} µs")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Tensor-parallel runs (`--tp N`) on torch.distributed: one process per rank, launched by torchrun.

    torchrun --nproc-per-node 2 -m kvstress sweep --model tiny-random --lengths 1k,2k --tp 2

Every rank loads the model sharded by transformers' own TP plan (models.load_sharded:
attention heads and MLP columns split over the ranks; `DistributedConfig(tp_size=N)`, which
transformers 5.17 and 5.24 both accept), gloo on CPU and NCCL on CUDA. Each rank's
compressed cache then holds only its own KV heads (its buffers are sized from the keys the
rank's layers produce), and since every per-head policy decides per KV head, a sharded run
keeps exactly the tokens an unsharded one keeps (tests/test_distributed.py checks it).

What the ranks agree on, after every measured forward (`Ranks.together`, one all-reduce):

    time     the step time is the slowest rank's (MAX of each rank's elapsed time)
    faults   an out-of-memory error (or the --max-memory budget), or any other error of the
             method, on any rank is raised on every rank, so each records the same "oom" or
             "error" point and goes on together, also
             when it struck halfway through the model's forward, while the other ranks
             waited in a collective (collectives.py); Ctrl-C or SIGTERM likewise stops
             every rank after the same step (and each exits as SIGTERM asked, if any rank got it)
    memory   each record's peaks and cache bytes are summed over the ranks (the job's
             memory, comparable with a --tp 1 record); a "ranks" event beside it holds
             every rank's own figures

Rank 0 alone writes the results file. The other ranks keep the records in memory (the
schedules read them: what is done, where a method ended) through an in-memory writer
(`ResultsWriter.in_memory`), which writes nothing. Collectives time out
(KVSTRESS_TP_TIMEOUT_S, default 600 s), and a rank that dies is named in the error the
others raise, never a silent hang.

The ranks are started once per run (run.execute, or compare for its runs) and passed to
whoever needs them: the model loading (models.load_model, which shards the model) and the
harness. Nothing here is imported when --tp is 1.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from . import collectives
from .config import launch_problem
from .errors import ConfigError, KvstressError, MethodFailed, RankLost, RunInterrupted, describe_failure, failure_site, first_line
from .results import ResultsWriter

TIMEOUT_ENV = "KVSTRESS_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
# The record fields summed over the ranks (each rank's own are in the "ranks" event).
MEMORY_FIELDS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_nvml_used_bytes", "peak_rss_bytes",
                 "cache_bytes", "cache_allocated_bytes")
_STORE_KEY = "kvstress/rank/{}"


def start(tp: int, device: torch.device) -> Ranks:
    """This process's rank: the process group joined (once per process; a later call, as from a
    library caller of models.load_model, finds it joined)."""
    problem = launch_problem(tp)
    if problem:
        raise ConfigError(problem)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
        atexit.register(_stop)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), device, backend, timeout_s)
    ranks.register()
    ranks.collectives = collectives.watch(ranks.store(), ranks.rank, ranks.world, timeout_s)
    return ranks


def _alive(pid: int) -> bool:
    """Whether process `pid` runs; a process that has just exited (a zombie, not yet reaped by
    its launcher) is not, nor is one still exiting a moment after its sockets closed."""
    import time

    import psutil

    for _ in range(10):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.1)
    return True


def _stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """This process's place in a --tp run and the collectives the measuring core needs."""

    def __init__(self, rank: int, world: int, device: torch.device, backend: str, timeout_s: float):
        self.rank = rank
        self.world = world
        self.device = device
        self.backend = backend
        self.timeout_s = timeout_s
        self.collectives: collectives.CollectiveLog | None = None  # set by start()
        # NCCL reduces tensors on the GPU, gloo on the host.
        self._tensor_device = device if backend == "nccl" else torch.device("cpu")

    # -- collectives, each turning a lost rank into one clear error -----------------------

    def _collective(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (RuntimeError, TimeoutError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            raise self.lost(what, error) from error

    def gather(self, value, what: str = "gather") -> list:
        values = [None] * self.world
        self._collective(what, dist.all_gather_object, values, value)
        return values

    def broadcast(self, value, what: str = "broadcast"):
        box = [value]
        self._collective(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self, what: str = "barrier") -> None:
        self._collective(what, dist.barrier)

    @staticmethod
    def store():
        """The process group's rendezvous store (torch keeps no public name for the default one)."""
        return dist.distributed_c10d._get_default_store()

    def register(self) -> None:
        """Say in the rendezvous store who this rank is, so that the others can name it if it dies."""
        try:
            self.store().set(_STORE_KEY.format(self.rank), f"{socket.gethostname()}:{os.getpid()}")
        except Exception:
            pass  # naming a dead rank is a courtesy; the run does not depend on it

    def dead_ranks(self) -> list[str]:
        """The ranks on this host whose process is gone, as "rank N (pid P)"."""
        dead = []
        try:
            store = self.store()
            store.set_timeout(timedelta(seconds=2))
        except Exception:
            return dead
        for rank in range(self.world):
            if rank == self.rank:
                continue
            try:
                host, pid = store.get(_STORE_KEY.format(rank)).decode().rsplit(":", 1)
            except Exception:
                continue
            if host == socket.gethostname() and not _alive(int(pid)):
                dead.append(f"rank {rank} (pid {pid})")
        return dead

    def lost(self, what: str, error: BaseException) -> RankLost:
        dead = self.dead_ranks()
        who = (f"{', '.join(dead)} died" if dead else
               f"another rank died or stopped answering (collectives time out after {self.timeout_s:g} s, "
               f"{TIMEOUT_ENV}; torchrun's summary names the rank that failed)")
        first = first_line(error)
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # gloo's source location first
        return RankLost(f"rank {self.rank} lost the other ranks during {what}: {who} ({first}); what was measured "
                        "is saved: continue with the same command plus --resume")

    # -- the run --------------------------------------------------------------------------

    def open_results(self, open_on_rank0):
        """Rank 0 opens the results file; the others mirror its records, or raise its error."""
        if self.rank == 0:
            try:
                writer = open_on_rank0()
            except BaseException as error:
                kind = type(error) if isinstance(error, KvstressError) else RuntimeError
                self.broadcast(("error", kind, str(error)), "opening the results file")
                raise
            self.broadcast(("ok", writer.records, writer.events), "opening the results file")
        else:
            payload = self.broadcast(None, "opening the results file")
            if payload[0] == "error":
                raise payload[1](payload[2])
            writer = ResultsWriter.in_memory(payload[1], payload[2])
        where = self.gather({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                             "device": str(self.device)}, "starting")
        writer.add_event({"type": "distributed", "world_size": self.world, "backend": self.backend,
                          "tensor_parallel": self.world, "ranks": where,
                          "message": "timing: the slowest rank's; memory in records: summed over ranks "
                                     "(each rank's own in the \"ranks\" events); samples: rank 0's"})
        return writer

    def together(self, what: str, function, stopped: Callable[[], str] = lambda: "stopped by the user"):
        """`function()` → (result, seconds) on every rank at once: (result, seconds, the slowest rank's).

        An out-of-memory error on any rank is raised on every rank, also one that struck inside
        the model's forward while the others went on to wait in a collective: the failed rank
        first stands in for the collectives they still wait in (collectives.py), so that every
        rank reaches the agreement (one all-reduce). Any other error on one rank is raised on
        every rank the same way, at once, as one MethodFailed naming each failed rank's error:
        the method ends there on every rank and the run goes on (rather than waiting out the
        collective timeout). Ctrl-C or SIGTERM on any rank stops every rank here
        (with the highest signal number asked for on any: SIGTERM over SIGINT)."""
        interrupted: RunInterrupted | None = None
        oom_message: str | None = None
        failure: Exception | None = None
        result, elapsed = None, 0.0
        self.collectives.begin()
        try:
            try:
                result, elapsed = function()
            except torch.OutOfMemoryError as error:  # its frames, holding activations, go with `error`
                oom_message = first_line(error, "out of memory")
            except RunInterrupted as error:
                interrupted = error
            except Exception as error:
                if isinstance(error, dist.DistError) or collectives.failed_collective(error):
                    raise self.lost(what, error) from error  # the collectives themselves are gone
                failure = error
            if oom_message is not None or failure is not None:
                self._collective(f"standing in for the collectives of {what} after an error",
                                 self.collectives.stand_in, self._tensor_device)
            else:
                self.collectives.agreeing()
            flags = torch.tensor([elapsed, float(oom_message is not None), float(interrupted.signum if interrupted else 0),
                                  float(failure is not None)], dtype=torch.float64, device=self._tensor_device)
            self._collective(what, dist.all_reduce, flags, op=dist.ReduceOp.MAX)
        finally:
            self.collectives.end()
        slowest, any_oom, any_stop, any_failure = flags.tolist()
        if any_failure:  # every rank records the same failed point (stream.Harness.guard) and goes on
            said = self.gather(None if failure is None else (describe_failure(failure), failure_site(failure)),
                               "agreeing on an error")
            failed = [(rank, text) for rank, text in enumerate(said) if text]
            message = "; ".join(f"rank {rank}: {line}" for rank, (line, _) in failed)
            raise MethodFailed(message, where=failed[0][1][1]) from failure
        if any_oom:
            said = self.gather(oom_message, "agreeing on an out-of-memory error")
            raise torch.OutOfMemoryError("; ".join(f"rank {rank}: {text}" for rank, text in enumerate(said) if text))
        if any_stop:
            raise RunInterrupted(str(interrupted) if interrupted else stopped(), int(any_stop))
        return result, elapsed, slowest

    def combine(self, stream, record: dict, writer) -> dict:
        """A record's memory summed over the ranks, and every rank's own figures as a "ranks" event."""
        own = {name: record.get(name) for name in MEMORY_FIELDS}
        per_rank = self.gather(own, "gathering memory peaks")
        summed = {name: None if any(r[name] is None for r in per_rank) else sum(r[name] for r in per_rank)
                  for name in MEMORY_FIELDS}
        writer.add_event({"type": "ranks", "method": stream.spec.name, "tokens_seen": stream.position,
                          "batch_size": int(stream.tokens.shape[0]), "world_size": self.world,
                          "per_rank": [{"rank": rank, **figures} for rank, figures in enumerate(per_rank)]})
        return {**record, **summed}

    def weight_bytes(self, model) -> int:
        """Bytes of this rank's share of the weights (a sharded parameter is a DTensor)."""
        total = 0
        for parameter in model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            total += local.numel() * local.element_size()
        return total

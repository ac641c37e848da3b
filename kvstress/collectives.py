"""A rank that fails inside a forward stands in for the collectives the other ranks wait in.

Under --tp the model's forward is full of collectives: an all-reduce after every attention
and MLP block, one for the embedding, an all-gather of the logits. When one rank runs out
of memory halfway through a forward, the others are already waiting in its next
collective, and would wait there until the collective timeout ended the run. So:

  every rank    notes each collective the model calls during a forward (which function,
                the tensor's shape and dtype, the reduction, the group: a few µs each),
                and a watcher thread looks in the rendezvous store every 50 ms for a fault
                posted in this forward; once there is one, the rank writes its notes to the
                store, and every collective it calls after that, up to the agreement that
                ends each forward (`Ranks.together`), as it calls it
  a failed rank posts the fault (with what it had called), then calls, with zeros, each
                collective the others describe, in order, until they describe the agreement
                (or, where every rank failed, until it has called as many as any of them);
                then every rank is in the agreement, learns of the fault, and records the
                same "oom" point

The forward the others finish is garbage (a zero where one rank's share belonged), and is
thrown away with the point. Collectives called some other way than through
`torch.distributed` and its functional collectives, as transformers' tensor parallelism
and DTensor call them, are not seen; a fault beside one of those still ends in the
collective timeout, with what was measured kept.
"""

from __future__ import annotations

import atexit
import pickle
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

POLL_S = 0.05
_KEY = "kvstress/forward/{}/{}"

# Collective functions and the names of their arguments between the tensor and the group
# (what, besides the tensor's shape and dtype and the group, says what to call again).
# Module attributes are replaced, since that is how transformers (`dist.all_reduce`) and
# DTensor (`funcol.all_reduce`, ...) call them.
_FUNCTIONS = {
    "dist.all_reduce": (dist, "all_reduce", ("op",)),
    "funcol.all_reduce": (funcol, "all_reduce", ("reduceOp",)),
    "funcol.all_gather_single": (funcol, "all_gather_single", ("gather_dim",)),
    "funcol.all_gather_tensor": (funcol, "all_gather_tensor", ("gather_dim",)),
    "funcol.reduce_scatter_single": (funcol, "reduce_scatter_single", ("reduceOp", "scatter_dim")),
    "funcol.reduce_scatter_tensor": (funcol, "reduce_scatter_tensor", ("reduceOp", "scatter_dim")),
}
_originals: dict[str, Callable] = {}
_log: CollectiveLog | None = None


def watch(store, rank: int, world: int, timeout_s: float) -> CollectiveLog:
    """Start noting this process's collectives (once per process)."""
    global _log
    if _log is None:
        _log = CollectiveLog(store, rank, world, timeout_s)
        for name, (module, attribute, _) in _FUNCTIONS.items():
            if hasattr(module, attribute):
                _originals[name] = getattr(module, attribute)
                setattr(module, attribute, _noted(name, _originals[name]))
    return _log


def failed_collective(error: BaseException) -> str | None:
    """The collective (noted during a forward) that raised `error`, or None: the process group
    failing under the model's forward, rather than the forward itself."""
    return getattr(error, "collective", None)


def _noted(name: str, original: Callable) -> Callable:
    def collective(tensor, *args, **kwargs):
        log = _log
        if log is None or not log.recording or log.nested:
            return original(tensor, *args, **kwargs)
        # As little as can be here (every collective of every forward): read when told.
        log.notes.append((name, tensor.shape, tensor.dtype, args, kwargs))
        if log.telling:
            log.tell()
        log.nested = True  # funcol's older names call the newer ones: one collective, noted once
        try:
            return original(tensor, *args, **kwargs)
        except RuntimeError as error:  # gloo's and NCCL's own errors are plain RuntimeErrors
            error.collective = name  # structured: the failure came from a collective (failed_collective)
            raise
        finally:
            log.nested = False

    collective.__wrapped__ = original
    return collective


def _described(note: tuple) -> tuple:
    """A note as plain values that another rank can read (the group by name)."""
    if note[0] == "agree":
        return note
    name, shape, dtype, args, kwargs = note
    argument_names = _FUNCTIONS[name][2]
    given = dict(zip(argument_names, args))
    given.update((key, kwargs[key]) for key in argument_names if key in kwargs)
    group = kwargs.get("group", args[len(argument_names)] if len(args) > len(argument_names) else None)
    if name.startswith("dist."):
        group_name = (group or dist.group.WORLD).group_name
        given = {key: getattr(value, "name", value) for key, value in given.items()}
    else:
        group_name = funcol._resolve_group_name(group)
    return name, tuple(shape), str(dtype).removeprefix("torch."), given, group_name


def _call_with_zeros(description: tuple, device: torch.device) -> None:
    """Call the collective `description` names with a zero tensor of its shape, and wait for it."""
    name, shape, dtype, given, group_name = description
    zeros = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
    original = _originals[name]
    if name == "dist.all_reduce":
        original(zeros, op=getattr(dist.ReduceOp, given.get("op", "SUM")),
                 group=dist.distributed_c10d._resolve_process_group(group_name))
    else:
        funcol.wait_tensor(original(zeros, **given, group=group_name))


class CollectiveLog:
    """This process's collectives in the current forward, and the fault protocol around them."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store = store
        self.rank = rank
        self.world = world
        self.timeout_s = timeout_s
        self.forward = 0  # the forward's serial number: the same on every rank
        self.recording = False  # inside the model's forward
        self.watching = False  # from the forward's start to the end of its agreement
        self.nested = False
        self.telling = False  # a fault was posted in this forward: every note goes to the store
        self.notes: list[tuple] = []  # this forward's collectives: (name, shape, dtype, args, kwargs)
        self._told = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="kvstress-fault-watch", daemon=True)
        self._watcher.start()
        # Stopped before the interpreter finalizes: a daemon thread inside a store call then
        # would abort the process ("terminate called without an active exception").
        atexit.register(self.stop)

    def stop(self) -> None:
        self._stopped.set()
        self._watcher.join(timeout=5)

    def _key(self, *parts) -> str:
        return _KEY.format(self.forward, "/".join(map(str, parts)))

    # -- every rank ---------------------------------------------------------------------

    def begin(self) -> None:
        with self._lock:
            self.forward += 1
            self.notes, self._told, self.telling = [], 0, False
            self.recording = self.watching = True

    def agreeing(self) -> None:
        """The forward is over on this rank and the agreement comes next: the last note."""
        self.recording = False
        self.notes.append(("agree",))
        if self.telling:
            self.tell()

    def end(self) -> None:
        self.recording = self.watching = False

    def tell(self) -> None:
        """Write the notes not yet in the store. The watcher sets `telling` and writes what is
        noted under the lock; a collective appends its note before it looks at `telling`: so
        no note is missed whichever comes first."""
        with self._lock:
            self._tell_locked()

    def _tell_locked(self) -> None:
        for index in range(self._told, len(self.notes)):
            self.store.set(self._key("call", index), pickle.dumps(_described(self.notes[index])))
        self._told = len(self.notes)

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            if not self.watching or self.telling:
                continue
            forward = self.forward
            try:
                posted = self.store.check([_KEY.format(forward, "fault")])
            except Exception:
                continue  # the store is gone (the run ended); the collective timeout still holds
            if posted:
                with self._lock:
                    if self.forward == forward and self.watching:  # not a forward begun since
                        self.telling = True
                        self._tell_locked()

    # -- a rank that failed ---------------------------------------------------------------

    def stand_in(self, device: torch.device) -> None:
        """After this rank failed inside the forward: post the fault, then call with zeros every
        collective the others go on to call, until they reach the agreement."""
        self.recording = False
        called = len(self.notes)
        self.tell()  # what this rank called, for a rank that failed before it
        self.store.set(self._key("failed", self.rank), str(called))
        self.store.set(self._key("fault"), "1")
        others = [rank for rank in range(self.world) if rank != self.rank]
        index, deadline = called, time.monotonic() + self.timeout_s
        while True:
            key = self._key("call", index)
            if self.store.check([key]):
                description = pickle.loads(self.store.get(key))
                if description[0] == "agree":
                    return
                _call_with_zeros(description, device)
                index, deadline = index + 1, time.monotonic() + self.timeout_s
                continue
            if all(self.store.check([self._key("failed", rank)]) for rank in others):
                # Every rank failed: the one that got furthest posted what it called.
                if index >= max(int(self.store.get(self._key("failed", rank))) for rank in others):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no other rank said which collective it waits in for {self.timeout_s:g} s")
            time.sleep(0.005)

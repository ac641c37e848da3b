"""The GPU proof of issue 15: NVML sampling, a real CUDA OOM mid-sweep, and `--compile`
capturing the compressed decode step as one CUDA graph.

    pytest -m gpu tests/test_gpu.py                          # on a machine with a CUDA GPU
    KVSTRESS_GPU_REHEARSAL=1 pytest -m gpu tests/test_gpu.py # the same code on CPU, tiny sizes

Without CUDA every test here is skipped with one reason, unless KVSTRESS_GPU_REHEARSAL=1:
then each runs on CPU with a tiny model (the OOM is the --max-memory budget, the compiled
step has no CUDA graph) so that a typo cannot waste a GPU lease; what only a GPU can show
(NVML, torch's allocator, CUDA graphs) is checked only on CUDA.

kvstress is driven through its command line (typer's CliRunner, in this process, so that
torch's allocator and the compile counters can be read around it) and its public cache
API (`make_cache`, `CompiledDecode`), never through the stream core's internals.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import logging
import math
import os
import random
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from kvstress import make_cache
from kvstress.caches.compiled import CompiledDecode
from kvstress.cli import app
from kvstress.results import load_results

CUDA = torch.cuda.is_available()
REHEARSAL = not CUDA and os.environ.get("KVSTRESS_GPU_REHEARSAL") == "1"
DEVICE = "cuda" if CUDA else "cpu"
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False); KVSTRESS_GPU_REHEARSAL=1 rehearses on CPU"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA and not REHEARSAL, reason=NO_GPU)]

# A small real architecture for the sampling tests; tiny-random when rehearsing on CPU.
SMALL_MODEL, SMALL_DTYPE = ("random:smollm2-135m", "bfloat16") if CUDA else ("tiny-random", "float32")
MiB, GiB = 1 << 20, 1 << 30


def write_text(path: Path, characters: int) -> str:
    """Plain prose-like text (random weights use a byte tokenizer: one token per character)."""
    words = "the of and to a in that is was he for it with as his on be at by i this had not".split()
    rng = random.Random(0)
    text, size = [], 0
    while size < characters:
        word = rng.choice(words)
        text.append(word)
        size += len(word) + 1
    path.write_text(" ".join(text), encoding="utf-8")
    return str(path)


def sweep(args: list[str]):
    """`kvstress sweep ARGS` in this process; the exit code and output are asserted by callers."""
    return CliRunner().invoke(app, ["sweep", *map(str, args)])


def settle() -> int:
    """Tensor bytes torch's CUDA allocator holds once garbage is collected (0 on CPU)."""
    gc.collect()
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def named_strings(node, key: str) -> list[str]:
    """Every string stored under `key` anywhere in a JSON tree."""
    found = []
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key and isinstance(value, str):
                found.append(value)
            found.extend(named_strings(value, key))
    elif isinstance(node, list):
        for value in node:
            found.extend(named_strings(value, key))
    return found


# --- NVML: device-wide memory sampled at every forward ----------------------------------


def test_every_forward_samples_device_used_reserved_and_allocated(tmp_path):
    text = write_text(tmp_path / "text.txt", 40_000)
    out = tmp_path / "nvml.json"
    result = sweep(["--model", SMALL_MODEL, "--device", DEVICE, "--dtype", SMALL_DTYPE, "--dataset", text,
                    "--lengths", "512,1024", "--chunk", "256", "--decode-steps", "4", "--capacity", "128",
                    "-m", "baseline", "-m", "h2o", "--out", out])
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    samples = doc["samples"]
    # 4 prefill chunks + 2 × 4 decode steps per method, at least (warm-up forwards are not sampled).
    for method in ("baseline", "h2o_4_16_128"):
        mine = [s for s in samples if s["method"] == method]
        assert len(mine) >= 12, f"{method}: {len(mine)} samples for 12 measured forwards"
        assert {s["phase"] for s in mine} == {"prefill", "decode"}
    assert all(s["rss_bytes"] for s in samples)
    if not CUDA:
        assert all(s["nvml_used_bytes"] is None and s["allocated_bytes"] is None for s in samples)
        return
    missing = [s for s in samples if None in (s["nvml_used_bytes"], s["reserved_bytes"], s["allocated_bytes"])]
    assert not missing, (f"{len(missing)} of {len(samples)} samples lack a GPU measure, e.g. {missing[0]}; "
                         f"environment says {doc['environment']['unavailable']}")
    disordered = [s for s in samples if not s["nvml_used_bytes"] >= s["reserved_bytes"] >= s["allocated_bytes"] > 0]
    assert not disordered, f"device-wide used ≥ reserved ≥ allocated fails at {len(disordered)} samples, e.g. {disordered[0]}"
    for record in doc["records"]:
        assert record["status"] == "ok", record
        assert record["peak_nvml_used_bytes"] >= record["peak_allocated_bytes"] > 0, record
    environment = doc["environment"]
    assert environment["nvidia_driver_version"], environment["unavailable"]
    assert environment["gpu_total_memory_bytes"] == torch.cuda.get_device_properties(0).total_memory


def short_baseline_sweep(tmp_path) -> dict:
    """The results of a 256-token sweep of the full cache on the small model."""
    text = write_text(tmp_path / "text.txt", 20_000)
    out = tmp_path / "short.json"
    result = sweep(["--model", SMALL_MODEL, "--device", DEVICE, "--dtype", SMALL_DTYPE, "--dataset", text,
                    "--lengths", "256", "--chunk", "128", "--decode-steps", "3", "-m", "baseline", "--out", out])
    assert result.exit_code == 0, result.output
    return load_results(out)


def test_nvml_failure_is_null_with_its_reason_never_zero(tmp_path, monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def broken_init(*args, **kwargs):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", broken_init)
    doc = short_baseline_sweep(tmp_path)
    assert doc["samples"] and all(s["nvml_used_bytes"] is None for s in doc["samples"])
    assert all(r["peak_nvml_used_bytes"] is None for r in doc["records"])
    assert "Driver Not Loaded" in doc["environment"]["unavailable"]["nvidia_driver_version"]
    if CUDA:  # torch's own counters do not need NVML
        assert all(s["allocated_bytes"] and s["reserved_bytes"] for s in doc["samples"])


def test_why_samples_have_no_device_wide_memory_is_in_the_results(tmp_path, monkeypatch):
    if CUDA:
        # NVML starts and knows the driver, but no NVML device is this torch device
        # (what a MIG slice or a renumbered container can look like).
        pynvml = pytest.importorskip("pynvml")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    doc = short_baseline_sweep(tmp_path)
    assert all(s["nvml_used_bytes"] is None for s in doc["samples"])
    # Anywhere but the samples themselves and the units table ("nvml_used_bytes": "bytes").
    reasons = named_strings({key: value for key, value in doc.items() if key not in ("samples", "units")},
                            "nvml_used_bytes")
    assert reasons, "no reason recorded for the null nvml_used_bytes samples"
    assert ("no NVML device matches" if CUDA else "no CUDA device") in reasons[0]


# --- a real CUDA out-of-memory mid-sweep -------------------------------------------------


def llama_2_7b_sizes() -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of random:llama-2-7b in bf16, from its shapes."""
    hidden, intermediate, layers, vocab = 4096, 11008, 32, 32000
    parameters = 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden
    return 2 * parameters, 2 * layers * hidden * 2


def test_real_oom_mid_sweep_is_a_result_and_the_next_method_starts_clean(tmp_path):
    length, chunk, capacity = (4096, 512, 256) if CUDA else (512, 128, 64)
    if CUDA:
        # The full cache of `batch` sequences of `length` tokens needs 1.25 × the card.
        model, dtype, budget = "random:llama-2-7b", "bfloat16", []
        weights, kv_per_token = llama_2_7b_sizes()
        total = torch.cuda.get_device_properties(0).total_memory
        batch = math.ceil(1.25 * total / (length * kv_per_token))
    else:
        # Rehearsal: tiny-random (2 layers, 2 KV heads × 16, float32) against a --max-memory
        # budget that the same arithmetic puts at 80 % of the full cache.
        model, dtype, batch = "tiny-random", "float32", 8
        weights, kv_per_token = 0, 2 * 2 * 2 * 16 * 4
        budget = ["--max-memory", str(int(0.8 * batch * length * kv_per_token) + 200_000)]
    text = write_text(tmp_path / "text.txt", batch * (length + 8) + 1000)
    out = tmp_path / "oom.json"
    before = settle()
    result = sweep(["--model", model, "--device", DEVICE, "--dtype", dtype, "--dataset", text,
                    "--lengths", length, "--chunk", chunk, "--decode-steps", "3", "--batch-size", batch,
                    "--capacity", capacity, "-m", "baseline", "-m", "streaming", "--out", out, *budget])
    after = settle()
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    records = {r["method"]: r for r in doc["records"]}
    streaming = f"streaming_4_{capacity}"
    assert set(records) == {"baseline", streaming}, doc["records"]

    failed = records["baseline"]
    assert failed["status"] == "oom" and failed["length"] == length, failed
    assert failed["tpot_ms_median"] is None and failed["cache_bytes"] is None, "an OOM point measured nothing"
    events = [e for e in doc["events"] if e.get("type") == "oom"]
    assert [e["method"] for e in events] == ["baseline"], doc["events"]
    assert 0 < events[0]["tokens_seen"] < length, f"not mid-sweep: {events[0]}"
    if CUDA:
        assert "out of memory" in failed["error"].lower() and "budget" not in failed["error"], failed["error"]

    survivor = records[streaming]
    assert survivor["status"] == "ok", survivor
    assert survivor["cache_tokens"] == capacity and survivor["tpot_ms_median"] > 0, survivor
    if not CUDA:
        return
    # The streaming stream holds the weights and its own cache: whatever the full cache held was
    # freed. Its least sample is the one to read (a decode step's): a prefill chunk's sample also
    # holds that chunk's activations, which at this batch are GiBs (14 GiB on an H200).
    baseline_samples = [s for s in doc["samples"] if s["method"] == "baseline"]
    streaming_samples = [s for s in doc["samples"] if s["method"] == streaming]
    assert baseline_samples and streaming_samples
    least = min(streaming_samples, key=lambda s: s["allocated_bytes"])
    assert least["allocated_bytes"] <= weights + least["cache_bytes"] + 2 * GiB, (
        f"the streaming method held at least {least['allocated_bytes'] / GiB:.1f} GiB: weights "
        f"{weights / GiB:.1f} GiB + its cache {least['cache_bytes'] / GiB:.1f} GiB; the full cache's memory "
        f"(up to {max(s['allocated_bytes'] for s in baseline_samples) / GiB:.1f} GiB) was not all freed")
    assert after - before <= 256 * MiB, (
        f"{(after - before) / MiB:.0f} MiB still allocated after the sweep returned (before {before / MiB:.0f} MiB)")


# --- --compile: the compressed decode step as one CUDA graph ------------------------------


@pytest.fixture
def cudagraph_watch(monkeypatch):
    """Fresh dynamo state; counts CUDA graph replays and collects "skipping cudagraphs" messages."""
    torch._dynamo.reset()
    counters.clear()
    watch = {"replays": 0, "messages": []}

    class Collect(logging.Handler):
        def emit(self, record):
            watch["messages"].append(record.getMessage())

    # set_logs first: it replaces the handlers of torch's loggers. torch._inductor does not
    # propagate to "torch", so the handler goes on it (the cudagraphs artifact logs under it).
    torch._logging.set_logs(cudagraphs=True)
    handler = Collect(level=logging.DEBUG)
    inductor_logger = logging.getLogger("torch._inductor")
    inductor_logger.addHandler(handler)
    replay = torch.cuda.CUDAGraph.replay

    def counted(self, *args, **kwargs):
        watch["replays"] += 1
        return replay(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    try:
        yield watch
    finally:
        inductor_logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()


def test_the_cuda_graph_watch_sees_a_skip(cudagraph_watch):
    """The watch itself: a skip that inductor reports is seen (so no skip means none happened)."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to this test")
    assert cudagraph_watch["messages"] == ["skipping cudagraphs due to this test"]
    with pytest.raises(AssertionError, match="skipping cudagraphs due to this test"):
        assert_one_cuda_graph(cudagraph_watch, 0)


def assert_one_cuda_graph(watch: dict, compiled_steps: int) -> None:
    """One dynamo graph, no break, no recompile; on CUDA replayed as a CUDA graph every step."""
    skips = [m for m in watch["messages"] if "skipping cudagraph" in m.lower()]
    assert not skips, skips
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["stats"]["unique_graphs"] == 1, f"the decode step recompiled: {dict(counters['stats'])}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    if CUDA:
        # One warm-up run and one recording, then every step a replay.
        assert watch["replays"] >= compiled_steps - 3, (
            f"{watch['replays']} CUDA graph replays for {compiled_steps} compiled steps: the step ran outside a graph")


def cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("spec, positions", [("h2o_2_6_24", "original"), ("streaming_4_24", "shifted")])
def test_compiled_decode_is_one_cuda_graph_with_the_eager_logits_and_kept_tokens(
        peaked_llama, cudagraph_watch, spec, positions):
    # float32 and peaked attention (conftest): H2O's argmin over scores then does not flip
    # on rounding, so the kept tokens must be the same token for token.
    model = copy.deepcopy(peaked_llama).to(DEVICE)
    argument = cache_argument(model)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    compiled_cache = make_cache(spec, model, positions=positions)
    eager_cache = make_cache(spec, model, positions=positions)
    decode = CompiledDecode(model, argument)
    assert decode.mode == ("reduce-overhead" if CUDA else "default")
    tolerance = dict(rtol=1e-4, atol=1e-4) if CUDA else dict(rtol=1e-5, atol=1e-5)
    compiled_steps = 0

    def eager(cache, start, end):
        return model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1, **{argument: cache}).logits

    with torch.no_grad():
        for cache in (compiled_cache, eager_cache):
            eager(cache, 0, 40)
        assert decode.compiles(compiled_cache, ids[:, :1])
        for position in range(40, 120):
            if position == 80:  # an eager chunk in between: the graph picks up after it
                for cache in (compiled_cache, eager_cache):
                    eager(cache, 80, 96)
            if 80 <= position < 96:
                continue
            # clone: a CUDA graph's output is overwritten by the next replay
            compiled_logits = decode(compiled_cache, ids[:, position : position + 1]).clone()
            compiled_steps += 1
            torch.testing.assert_close(compiled_logits, eager(eager_cache, position, position + 1), **tolerance)
        for layer in range(2):
            assert torch.equal(compiled_cache.kept_positions(layer), eager_cache.kept_positions(layer))
        # The sweep warms up on a stream's own cache and then resets it: same buffers, same graph.
        compiled_cache.reset()
        fresh = make_cache(spec, model, positions=positions)
        for cache in (compiled_cache, fresh):
            eager(cache, 100, 140)
        for position in range(140, 160):
            compiled_logits = decode(compiled_cache, ids[:, position : position + 1]).clone()
            compiled_steps += 1
            torch.testing.assert_close(compiled_logits, eager(fresh, position, position + 1), **tolerance)
    for layer in range(2):
        assert torch.equal(compiled_cache.kept_positions(layer), fresh.kept_positions(layer))
    assert_one_cuda_graph(cudagraph_watch, compiled_steps)


def test_sweep_compile_records_compiled_points_without_skipping_cuda_graphs(tmp_path, cudagraph_watch):
    text = write_text(tmp_path / "text.txt", 20_000)
    out = tmp_path / "compiled.json"
    result = sweep(["--model", "tiny-random", "--device", DEVICE, "--dataset", text, "--lengths", "192,384",
                    "--chunk", "64", "--decode-steps", "8", "--capacity", "48", "-m", "h2o", "--compile",
                    "--out", out])
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert doc["config"]["compile"] is True
    records = doc["records"]
    assert [(r["method"], r["length"], r["status"]) for r in records] == [
        ("h2o_4_6_48", 192, "ok"), ("h2o_4_6_48", 384, "ok")]
    assert all(r["cache_tokens"] == 48 and r["tpot_ms_median"] > 0 for r in records)
    # Two checkpoints × (8 steps - TTFT step - attention probe) compiled steps, after the warm-up.
    assert_one_cuda_graph(cudagraph_watch, 2 * 6)
    assert json.loads(out.read_text())["complete"] is True

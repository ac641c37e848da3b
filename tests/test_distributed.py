"""Tensor-parallel runs (--tp) on CPU: gloo, two processes launched by torchrun.

One torchrun launch (module fixture, ~20 s on 2 cores) runs this file as a script on two
ranks; each rank writes what it saw to JSON, and the tests read it:

  equality   a tiny GQA Llama (4 query heads, 2 KV heads: each rank holds 1 KV head) with
             peaked attention, loaded sharded (--tp 2) and unsharded in the same process:
             logits and every layer's kept positions equal, for baseline, streaming and
             h2o, token by token and chunk by chunk; each rank's cache is half the bytes
  sweep      `kvstress sweep --tp 2` through the CLI, with an out-of-memory error injected
             on rank 1 only (streaming, second checkpoint) and rank 1 made 40 ms slower per
             forward: the OOM is recorded once, the next method runs, the step time is the
             slowest rank's, and only rank 0 ever writes the results file
  faults     out of memory inside a forward, on one rank and on both at different layers;
             another error inside a forward on one rank: every rank stops at once

A rank that dies is named by the survivor (two plain processes, no torchrun). The
launch-time refusals (--tp outside torchrun, a world size that differs, --device-map)
need no second process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstress.config import launch_problem

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
SPECS = ("baseline", "streaming_4_32", "h2o_4_8_32")
SCHEDULES = {"tokens": [24] + [1] * 72, "chunks": [24, 8, 8, 8, 8, 8, 8, 8, 16]}  # 96 tokens, capacity 32
SLOW_S = 0.04  # rank 1's extra time per forward in the sweep
OOM_METHOD = "streaming_4_32"  # out of memory on rank 1 after a forward
# Out of memory inside a forward, at a layer's attention: {method: {rank: layer}}. The
# collectives of the tiny Llama's forward: embedding, then per layer attention and MLP, then
# the logits. h2o: rank 1 fails after three, rank 0 waits in the fourth; baseline: rank 1
# fails after one, and rank 0 two further on, once rank 1 has stood in for it.
INSIDE_FORWARD = {"h2o_4_8_32": {1: 1}, "baseline": {1: 0, 0: 1}}


# -- the two ranks (this file run by torchrun) -------------------------------------------------


def _peaked_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=272, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked attention, as in trained models: H2O then differs from "keep the oldest"
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    model.save_pretrained(folder)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # A folder loads with its tokenizer; this one is never used (the test feeds token ids).
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(folder)


def _equality(out: Path, rank: int) -> dict:
    from kvstress import distributed
    from kvstress.caches import cache_bytes, make_cache
    from kvstress.models import cache_argument, load_model

    ranks = distributed.start(2, torch.device("cpu"))
    folder = out / "peaked"
    if rank == 0:
        _peaked_llama(folder)
    ranks.barrier()
    whole = load_model(str(folder), device="cpu", dtype="float32").model
    shard = load_model(str(folder), device="cpu", dtype="float32", tp=2).model
    argument = cache_argument(whole)
    ids = torch.randint(4, 260, (1, 96), generator=torch.Generator().manual_seed(1))
    seen = {}
    for spec in SPECS:
        for mode, sizes in SCHEDULES.items():
            caches = [make_cache(spec, model) for model in (whole, shard)]
            worst, kept_equal, position = 0.0, True, 0
            with torch.no_grad():
                for size in sizes:
                    chunk = ids[:, position : position + size]
                    position += size
                    logits = [model(input_ids=chunk, use_cache=True, logits_to_keep=0, **{argument: cache}).logits
                              for model, cache in zip((whole, shard), caches)]
                    worst = max(worst, (logits[0] - logits[1]).abs().max().item())
                    if hasattr(caches[1], "kept_positions"):
                        for layer in range(2):
                            mine = caches[1].kept_positions(layer)  # [batch, 1 KV head, kept]
                            reference = caches[0].kept_positions(layer)[:, rank : rank + mine.shape[1]]
                            kept_equal &= torch.equal(mine, reference)
            compressed = hasattr(caches[1], "kept_positions")
            seen[f"{spec}/{mode}"] = {
                "max_logit_diff": worst, "kept_equal": kept_equal,
                "local_kv_heads": caches[1].kept_positions(0).shape[1] if compressed else None,
                "kept": caches[1].kept_positions(1).tolist() if compressed else None,
                "bytes_sharded": cache_bytes(caches[1]), "bytes_whole": cache_bytes(caches[0]),
            }
    return seen


def _sweep(out: Path, rank: int, text: Path) -> int:
    import typer
    from transformers.models.llama import modeling_llama

    import kvstress.results as results
    from kvstress import stream
    from kvstress.cli import app

    original_write = results._write_atomically

    def logged_write(path, text):  # who writes which file, and how often
        with open(out / f"writes-rank{rank}.log", "a") as log:
            log.write(f"{path}\n")
        original_write(path, text)

    results._write_atomically = logged_write
    original_after, original_forward = stream.Harness.after_forward, stream.Stream._forward
    original_attention = modeling_llama.LlamaAttention.forward
    at = {}  # the stream whose forward runs now: its method, and the tokens before this forward

    def noted_forward(self, *args, **kwargs):
        at.update(method=self.spec.name, position=self.position)
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            at.clear()

    def attention(self, *args, **kwargs):
        # Out of memory inside the model's forward (past 160 tokens), in the attention of the
        # layers INSIDE_FORWARD gives this rank: the other rank is then waiting in a collective.
        if at.get("method") in INSIDE_FORWARD and at["position"] > 160:
            if self.layer_idx == INSIDE_FORWARD[at["method"]].get(rank):
                raise torch.OutOfMemoryError(f"injected on rank {rank} in layer {self.layer_idx}'s attention")
        return original_attention(self, *args, **kwargs)

    stream.Stream._forward = noted_forward
    modeling_llama.LlamaAttention.forward = attention
    if rank == 1:

        def after_forward(self, s, count, phase):
            original_after(self, s, count, phase)
            if s.spec.name == OOM_METHOD and s.position > 160:
                raise torch.OutOfMemoryError("injected on rank 1 only")

        stream.Harness.after_forward = after_forward

        def slow_forward(self, *args, **kwargs):  # inside the timed region, after the model's collectives
            import time

            logits, elapsed = noted_forward(self, *args, **kwargs)
            time.sleep(SLOW_S)
            return logits, elapsed + SLOW_S

        stream.Stream._forward = slow_forward
    command = typer.main.get_command(app)
    try:
        return command.main(["sweep", "--model", "tiny-random", "--device", "cpu", "--dataset", str(text),
                             "--lengths", "128,256", "--chunk", "64", "--decode-steps", "5",
                             "--method", ",".join(SPECS[1:]) + ",baseline", "--tp", "2",
                             "--out", str(out / "sweep" / "results.json")], standalone_mode=False) or 0
    finally:
        stream.Harness.after_forward, stream.Stream._forward = original_after, original_forward
        modeling_llama.LlamaAttention.forward = original_attention
        results._write_atomically = original_write


# ppl, needle and batch: each run with --tp 2 here and with --tp 1 by the tests, records compared.
OTHER_COMMANDS = {
    "ppl": ["ppl", "--tokens", "192", "--buckets", "96", "--chunk", "16"],
    "needle": ["needle", "--lengths", "128,160", "--depths", "0,100", "--needles", "1", "--max-new-tokens", "3",
               "--chunk", "32"],
    "batch": ["batch", "--length", "96", "--batch-sizes", "1,2", "--chunk", "32", "--decode-steps", "4"],
}


def other_command(name: str, text: Path, out: Path) -> list[str]:
    return [*OTHER_COMMANDS[name], "--model", "tiny-random", "--device", "cpu", "--dataset", str(text),
            "--method", ",".join(SPECS), "--out", str(out)]


def _others(out: Path, text: Path) -> dict:
    import typer

    from kvstress.cli import app

    command = typer.main.get_command(app)
    return {name: command.main([*other_command(name, text, out / name / "results.json"), "--tp", "2"],
                               standalone_mode=False) or 0 for name in OTHER_COMMANDS}


def _failure(out: Path, rank: int, text: Path) -> dict:
    """Rank 1 hits a bug (not out of memory) inside a forward of streaming_4_32, past the first point."""
    import contextlib
    import io
    import time

    import typer
    from transformers.models.llama import modeling_llama

    from kvstress.cli import app

    original_attention = modeling_llama.LlamaAttention.forward

    def attention(self, *args, **kwargs):
        # The method's own cache (past_key_values in earlier 5.x releases), whose tokens seen tell where it is.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        spec = getattr(cache, "spec", None)
        if rank == 1 and self.layer_idx == 1 and spec is not None and spec.name == "streaming_4_32" and cache.seen > 160:
            raise ValueError("injected bug on rank 1")
        return original_attention(self, *args, **kwargs)

    modeling_llama.LlamaAttention.forward = attention
    began, stderr, raised, code = time.monotonic(), io.StringIO(), None, None
    try:
        with contextlib.redirect_stderr(stderr):
            code = typer.main.get_command(app).main(
                ["sweep", "--model", "tiny-random", "--device", "cpu", "--dataset", str(text), "--lengths", "128,256",
                 "--chunk", "64", "--decode-steps", "5", "--method", "streaming_4_32,baseline", "--tp", "2",
                 "--out", str(out / "failure" / "results.json")], standalone_mode=False) or 0
    except Exception as error:
        raised = f"{type(error).__name__}: {error}"
    finally:
        modeling_llama.LlamaAttention.forward = original_attention
    return {"exit": code, "raised": raised, "seconds": time.monotonic() - began, "stderr": stderr.getvalue()}


def _compare(out: Path, text: Path) -> dict:
    """`kvstress compare --tp 2`: what each rank prints."""
    import contextlib
    import io

    import typer

    from kvstress.cli import app

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = typer.main.get_command(app).main(
            ["compare", "--model", "tiny-random", "--device", "cpu", "--datasets", str(text), "--tokens", "192",
             "--chunk", "16", "--method", "baseline,streaming_4_32", "--tp", "2", "--out-dir", str(out / "compare")],
            standalone_mode=False) or 0
    return {"exit": code, "printed": printed.getvalue()}


def _main(out: Path, text: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seen = {"equality": _equality(out, rank), "sweep_exit": _sweep(out, rank, text), "others_exit": _others(out, text),
            "compare": _compare(out, text), "failure": _failure(out, rank, text)}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


# -- the tests -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    text = out / "text.txt"
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    text.write_text(" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(600)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KVSTRESS_TP_TIMEOUT_S": "60", "PYTHONPATH": str(ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), str(HERE), str(out), str(text)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow  # torchrun launches (the module's one launch)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("mode", list(SCHEDULES))
def test_tp2_logits_and_kept_positions_equal_tp1(launched, spec, mode):
    _, ranks = launched
    for rank, seen in enumerate(ranks):
        case = seen["equality"][f"{spec}/{mode}"]
        assert case["max_logit_diff"] < 1e-4, (rank, case)
        assert case["kept_equal"], (rank, case)
        assert case["bytes_sharded"] * 2 == case["bytes_whole"], (rank, case)  # half the KV heads, half the bytes
        if spec != "baseline":
            assert case["local_kv_heads"] == 1  # GQA: 2 KV heads over 2 ranks
            assert len(case["kept"][0][0]) == 32  # evicting: 96 tokens through capacity 32
    if spec == "h2o_4_8_32":  # heavy hitters, not StreamingLLM's sinks + recent window
        h2o = ranks[0]["equality"][f"h2o_4_8_32/{mode}"]["kept"]
        streaming = ranks[0]["equality"][f"streaming_4_32/{mode}"]["kept"]
        assert h2o != streaming


@pytest.mark.slow  # torchrun launches (the module's one launch)
@pytest.mark.parametrize("name", list(OTHER_COMMANDS))
def test_ppl_needle_and_batch_under_tp2_record_what_tp1_records(launched, name, tmp_path):
    """The same points, perplexities, needle answers and cache sizes (summed over the ranks) as one process."""
    out, ranks = launched
    assert [seen["others_exit"][name] for seen in ranks] == [0, 0]
    from typer.testing import CliRunner

    from kvstress.cli import app

    single = tmp_path / "tp1.json"
    result = CliRunner().invoke(app, other_command(name, out / "text.txt", single))
    assert result.exit_code == 0, result.output
    sharded, whole = (json.loads(path.read_text()) for path in (out / name / "results.json", single))

    def points(doc):
        return [(r["method"], r["length"], r["batch_size"], r["status"], r["cache_tokens"], r["cache_bytes"],
                 None if r["nll_mean"] is None else round(r["nll_mean"], 4)) for r in doc["records"]]

    assert points(sharded) == points(whole)
    cells = [[(e["method"], e["length"], e["depth"], [a["answer"] for a in e["answers"]])
              for e in doc["events"] if e["type"] == "needle_cell"] for doc in (sharded, whole)]
    assert cells[0] == cells[1]


def _results(out: Path) -> dict:
    return json.loads((out / "sweep" / "results.json").read_text())


@pytest.mark.slow  # torchrun launches (the module's one launch)
def test_compare_under_tp2_prints_one_table_from_rank0(launched):
    out, ranks = launched
    zero, one = (seen["compare"] for seen in ranks)
    assert zero["exit"] == one["exit"] == 0
    assert one["printed"] == ""  # rank 1 neither talks nor reads a file rank 0 may be writing
    rows = [line for line in zero["printed"].splitlines() if line.startswith("| streaming_4_32")]
    assert len(rows) == 1 and "–" not in rows[0].split("|")[3], zero["printed"]  # its perplexity is there


@pytest.mark.slow  # torchrun launches (the module's one launch)
def test_oom_on_one_rank_is_recorded_once_and_the_run_goes_on(launched):
    out, ranks = launched
    assert [seen["sweep_exit"] for seen in ranks] == [0, 0]
    doc = _results(out)
    status = {(r["method"], r["length"]): r["status"] for r in doc["records"]}
    assert status == {("streaming_4_32", 128): "ok", ("streaming_4_32", 256): "oom",
                      ("h2o_4_8_32", 128): "ok", ("h2o_4_8_32", 256): "oom",
                      ("baseline", 128): "ok", ("baseline", 256): "oom"}
    errors = {r["method"]: r["error"] for r in doc["records"] if r["status"] == "oom"}
    assert errors["streaming_4_32"] == "rank 1: injected on rank 1 only"
    ooms = [(e["method"], e["length"]) for e in doc["events"] if e["type"] == "oom"]
    assert ooms == [("streaming_4_32", 256), ("h2o_4_8_32", 256), ("baseline", 256)]
    assert doc["complete"] is True


@pytest.mark.slow  # torchrun launches (the module's one launch)
def test_oom_inside_a_forward_on_one_rank_is_agreed_without_waiting(launched):
    """Rank 1 runs out of memory in layer 1's attention while rank 0 goes on to wait in the
    next all-reduce: rank 1 stands in for it, both record the point and the run goes on (a
    wait would have ended the run after the 60 s collective timeout, with exit 2)."""
    out, ranks = launched
    doc = _results(out)
    errors = {r["method"]: r["error"] for r in doc["records"] if r["status"] == "oom"}
    assert errors["h2o_4_8_32"] == "rank 1: injected on rank 1 in layer 1's attention"
    # Both ranks out of memory inside the same forward, at different layers.
    assert errors["baseline"] == ("rank 0: injected on rank 0 in layer 1's attention; "
                                  "rank 1: injected on rank 1 in layer 0's attention")
    assert [seen["sweep_exit"] for seen in ranks] == [0, 0]


@pytest.mark.slow  # torchrun launches (the module's one launch)
def test_another_error_inside_a_forward_on_one_rank_is_one_failed_point_on_every_rank(launched):
    """A bug on rank 1 inside the model's forward: rank 1 stands in for the collective rank 0
    waits in; every rank records the same failed point naming rank 1's error (long before the
    60 s collective timeout), the next method runs on every rank, and both exit with 3."""
    out, ranks = launched
    zero, one = (seen["failure"] for seen in ranks)
    assert (zero["exit"], one["exit"]) == (3, 3) and zero["raised"] is one["raised"] is None, (zero, one)
    assert "Traceback" not in zero["stderr"] + one["stderr"]
    assert zero["seconds"] < 30, zero
    doc = json.loads((out / "failure" / "results.json").read_text())
    assert [(r["method"], r["length"], r["status"]) for r in doc["records"]] == [
        ("streaming_4_32", 128, "ok"), ("streaming_4_32", 256, "error"), ("baseline", 128, "ok"),
        ("baseline", 256, "ok")]
    assert doc["records"][1]["error"].startswith("rank 1: ValueError: injected bug on rank 1 (at tests/test_distributed.py:")
    assert doc["complete"] is True


@pytest.mark.slow  # torchrun launches (the module's one launch)
def test_results_written_by_rank0_only_with_per_rank_memory_and_slowest_time(launched):
    out, ranks = launched
    assert not (out / "writes-rank1.log").exists()  # rank 1 never wrote a results file
    written = set((out / "writes-rank0.log").read_text().split())
    assert written == {str(out / "sweep" / "results.json")}
    assert sorted(p.name for p in (out / "sweep").iterdir()) == ["results.json"]
    doc = _results(out)
    assert doc["config"]["tp"] == 2
    (started,) = [e for e in doc["events"] if e["type"] == "distributed"]
    assert started["world_size"] == 2 and [r["rank"] for r in started["ranks"]] == [0, 1]
    per_point = [e for e in doc["events"] if e["type"] == "ranks"]
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    assert len(per_point) == len(ok)
    for event, record in zip(per_point, ok):
        halves = [r["cache_bytes"] for r in event["per_rank"]]
        assert halves[0] == halves[1] and sum(halves) == record["cache_bytes"]  # summed over the ranks
        assert record["peak_rss_bytes"] == sum(r["peak_rss_bytes"] for r in event["per_rank"])
        # rank 1 is SLOW_S slower per forward: the step time is the slowest rank's
        assert record["tpot_ms_median"] >= SLOW_S * 1000, record


def test_tp_refused_outside_torchrun(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from kvstress.cli import app

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["sweep", "--model", "tiny-random", "--tp", "2", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "torchrun --nproc-per-node 2" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r.json").exists()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "torchrun started 3 processes" in launch_problem(2)
    assert launch_problem(3) is None


def test_device_map_refused_naming_tp(tmp_path):
    from typer.testing import CliRunner

    from kvstress.cli import app

    result = CliRunner().invoke(app, ["sweep", "--model", "tiny-random", "--device-map", "auto",
                                      "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "--tp N" in result.output


def _dead_rank() -> None:
    """Rank 1 dies after joining; rank 0's next collective names it (no torchrun to do it)."""
    from kvstress import distributed

    ranks = distributed.start(2, torch.device("cpu"))
    ranks.barrier()
    if ranks.rank == 1:
        os._exit(3)
    try:
        ranks.gather("anything", "a gather")
    except distributed.RankLost as lost:
        print(f"LOST: {lost}", flush=True)


@pytest.mark.slow  # torchrun launch
def test_a_dead_rank_is_named_not_waited_for(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "KVSTRESS_TP_TIMEOUT_S": "30", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launched = [subprocess.Popen([sys.executable, str(HERE), "dead"], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for r in (0, 1)]
    output = launched[0].communicate(timeout=120)[0]
    launched[1].wait(timeout=30)
    assert f"LOST: rank 0 lost the other ranks during a gather: rank 1 (pid {launched[1].pid}) died" in output, output
    assert "--resume" in output


@pytest.mark.slow  # two torchrun launches
def test_a_stop_signal_under_torchrun_stops_every_rank_and_resume_finishes(tmp_path):
    """A stop signal sent to the process group reaches torchrun and both ranks, and torchrun
    passes it on to them again: every rank stops after the same step, rank 0 keeps what was
    measured and says how to resume, and --resume measures only what is missing. Sent here as
    SIGTERM (a scheduler's); the terminal's Ctrl-C is the same handler with another signal
    number (test_signals.py, test_reliability.py: two within a second are one)."""
    stop = signal.SIGTERM
    import time

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(1500)))
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KVSTRESS_TP_TIMEOUT_S": "60", "PYTHONPATH": str(ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    lengths = [128 * n for n in range(1, 9)]

    def command(*extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "kvstress", "sweep", "--model", "tiny-random", "--device",
                "cpu", "--dataset", str(text), "--lengths", ",".join(map(str, lengths)), "--chunk", "8",
                "--decode-steps", "3", "-m", "streaming_4_32", "--tp", "2", "--out", str(out), *extra]

    process = subprocess.Popen(command(), cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(out.read_text())["records"]:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(process.pid, stop)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode != 0
    assert "continue with the same command plus --resume" in stderr, stderr[-3000:]
    assert "lost the other ranks" not in stderr, stderr[-3000:]  # no rank left waiting for another
    interrupted = json.loads(out.read_text())
    assert interrupted["complete"] is False and 0 < len(interrupted["records"]) < len(lengths)

    resumed = subprocess.run(command("--resume"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and [r["length"] for r in doc["records"]] == lengths
    assert doc["records"][: len(interrupted["records"])] == interrupted["records"]  # kept, not measured again


if __name__ == "__main__":
    if sys.argv[1] == "dead":
        _dead_rank()
    else:
        _main(Path(sys.argv[1]), Path(sys.argv[2]))

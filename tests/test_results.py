"""Tests for kvstress.results: the schema, atomic writes, resume, loading, environment."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re

import pytest
import torch

from kvstress import results
from kvstress.results import (
    RECORD_FIELDS,
    SAMPLE_FIELDS,
    UNITS,
    ResultsError,
    ResultsWriter,
    environment,
    load_results,
)

CONFIG = {"model": "tiny-random", "methods": ["baseline", "h2o_4_32_256"], "lengths": [2000, 4000]}


def record(**fields):
    base = {"method": "baseline", "length": 2000, "status": "ok", "tpot_ms_median": 11.0}
    return {**base, **fields}


def sample(step=0, **fields):
    base = {"method": "baseline", "step": step, "tokens_seen": step + 1, "phase": "decode",
            "rss_bytes": 1000 + step}
    return {**base, **fields}


@pytest.fixture
def writer(tmp_path):
    return ResultsWriter(tmp_path / "out" / "results.json", "sweep", CONFIG, {"device": "cpu"})


def on_disk(writer):
    return json.loads(writer.path.read_text(encoding="utf-8"))


def test_field_lists_match_the_schema():
    assert RECORD_FIELDS == (
        "method", "length", "status", "batch_size", "ttft_s", "tpot_ms_median", "tpot_ms_p90",
        "tpot_spread", "load_per_core", "throughput_tok_s", "attn_ms_mean", "peak_allocated_bytes",
        "peak_reserved_bytes", "peak_nvml_used_bytes", "peak_rss_bytes", "cache_bytes", "cache_allocated_bytes", "cache_tokens",
        "nll_mean",
        "perplexity", "tokens_scored", "scope", "timing_unstable", "error",
    )
    assert SAMPLE_FIELDS == (
        "method", "step", "tokens_seen", "phase", "elapsed_s", "allocated_bytes",
        "reserved_bytes", "nvml_used_bytes", "rss_bytes", "cache_bytes", "cache_allocated_bytes",
    )
    # Every numeric field has a unit; strings have none.
    numeric = (set(RECORD_FIELDS) | set(SAMPLE_FIELDS)) - {"method", "status", "error", "phase", "timing_unstable",
                                                            "scope"}
    assert set(UNITS) == numeric
    assert UNITS["ttft_s"] == "s" and UNITS["tpot_ms_median"] == "ms"
    assert UNITS["peak_allocated_bytes"] == "bytes"


def test_writer_creates_the_file_at_once(writer):
    doc = on_disk(writer)
    assert doc["format"] == "kvstress-results" and doc["version"] == 1
    assert doc["kind"] == "sweep" and doc["complete"] is False
    assert doc["config"] == CONFIG
    assert doc["environment"] == {"device": "cpu"}
    assert doc["units"] == UNITS
    assert doc["records"] == doc["samples"] == doc["events"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", doc["created"])


def test_every_call_leaves_valid_json_on_disk(writer):
    added = writer.add_record(record(perplexity=12.5))
    doc = on_disk(writer)
    assert doc["records"] == [added]
    assert set(added) == set(RECORD_FIELDS)
    assert added["peak_allocated_bytes"] is None  # not measured is null, not 0
    assert added["perplexity"] == 12.5

    writer.add_samples([sample(0), sample(1, cache_bytes=4096)])
    doc = on_disk(writer)
    assert [s["step"] for s in doc["samples"]] == [0, 1]
    assert doc["samples"][1]["cache_bytes"] == 4096
    assert doc["samples"][0]["allocated_bytes"] is None

    writer.add_event({"type": "oom", "method": "baseline", "length": 4000, "message": "CUDA OOM"})
    doc = on_disk(writer)
    assert doc["events"][0]["type"] == "oom" and doc["events"][0]["length"] == 4000
    assert "time" in doc["events"][0]
    assert doc["complete"] is False

    writer.finish()
    assert on_disk(writer)["complete"] is True
    assert load_results(writer.path)["records"] == [added]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (record(tpot=1.0), "unknown record field"),
        (record(status="crashed"), "status must be one of"),
        (record(length=None), "'length' is required"),
        (record(length=2000.0), "'length' must be an integer"),
        (record(ttft_s="fast"), "'ttft_s' must be a number"),
        (record(perplexity=float("inf")), "JSON cannot hold"),
        (record(cache_bytes=True), "'cache_bytes' must be an integer"),
        (record(error=3), "'error' must be a string"),
        (record(scope="all"), "scope must be one of"),
    ],
)
def test_bad_records_are_refused_and_not_written(writer, bad, message):
    with pytest.raises(ValueError, match=message):
        writer.add_record(bad)
    assert on_disk(writer)["records"] == []


def test_bad_samples_are_refused(writer):
    with pytest.raises(ValueError, match="phase must be one of"):
        writer.add_samples([sample(0), sample(1, phase="generate")])
    with pytest.raises(ValueError, match="unknown sample field"):
        writer.add_samples([sample(0, gpu_bytes=1)])
    assert on_disk(writer)["samples"] == []


def test_event_needs_a_type(writer):
    with pytest.raises(ValueError, match="type"):
        writer.add_event({"message": "x"})


def test_unwritable_path_under_a_file_fails_at_once(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(ResultsError, match="choose a writable output path") as caught:
        ResultsWriter(blocker / "results.json", "sweep", CONFIG, {})
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_read_only_folder_fails_at_once(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ResultsError, match="Permission denied.*writable output path"):
            ResultsWriter(folder / "results.json", "sweep", CONFIG, {})
    finally:
        folder.chmod(0o700)


def test_directory_or_existing_file_is_refused(tmp_path, writer):
    with pytest.raises(ResultsError, match="is a directory"):
        ResultsWriter(tmp_path, "sweep", CONFIG, {})
    with pytest.raises(ResultsError, match="already exists"):
        ResultsWriter(writer.path, "sweep", CONFIG, {})
    ResultsWriter(writer.path, "sweep", CONFIG, {}, overwrite=True)
    assert on_disk(writer)["records"] == []


def test_crash_during_replace_keeps_the_previous_file(writer, monkeypatch):
    writer.add_record(record())
    before = writer.path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ResultsError, match="No space left on device"):
        writer.add_record(record(length=4000))
    assert writer.path.read_bytes() == before
    assert json.loads(before)["records"][0]["length"] == 2000
    # No temporary file is left behind.
    assert [p.name for p in writer.path.parent.iterdir()] == ["results.json"]


def test_kill_during_write_keeps_the_previous_file(writer, monkeypatch):
    """A process killed half-way through writing the temp file never touches the real one."""
    writer.add_record(record())
    before = writer.path.read_bytes()

    def killed(fd):
        raise KeyboardInterrupt  # stands in for a signal arriving before fsync returns

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.add_samples([sample(0)])
    assert writer.path.read_bytes() == before
    load_results(writer.path)


def test_written_file_keeps_the_umask_mode(writer):
    umask = os.umask(0)
    os.umask(umask)
    assert writer.path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_resume_keeps_everything_and_knows_what_is_done(writer):
    writer.add_record(record(length=2000))
    writer.add_record(record(method="h2o_4_32_256", length=2000))
    writer.add_record(record(length=4000, status="oom", error="CUDA out of memory"))
    writer.add_record(record(method="h2o_4_32_256", length=4000, status="error", error="boom"))
    writer.add_samples([sample(i) for i in range(5)])
    writer.finish()

    resumed = ResultsWriter.resume(writer.path, dict(CONFIG), environment={"device": "cuda:0"})
    assert resumed.done_points() == {
        ("baseline", 2000), ("h2o_4_32_256", 2000), ("baseline", 4000),
    }  # the error point is tried again
    assert len(resumed.records) == 4 and resumed.sample_count == 5
    doc = on_disk(resumed)
    assert doc["complete"] is False
    assert doc["events"][-1]["type"] == "resume"
    assert doc["events"][-1]["environment"] == {"device": "cuda:0"}

    resumed.add_samples([sample(5)])
    resumed.add_record(record(method="h2o_4_32_256", length=4000))
    resumed.finish()
    doc = load_results(writer.path)
    assert [s["step"] for s in doc["samples"]] == list(range(6))
    assert len(doc["records"]) == 5 and doc["complete"] is True
    assert doc["created"] == on_disk(writer)["created"]


def test_a_file_written_before_the_scope_field_loads_and_resumes(writer):
    """Files from before "scope" existed: their records lack the key; resuming keeps them (scope null)
    and takes new records with it."""
    writer.add_record(record(perplexity=12.5, scope="bucket"))
    doc = on_disk(writer)
    assert doc["records"][0]["scope"] == "bucket"
    del doc["records"][0]["scope"]
    writer.path.write_text(json.dumps(doc), encoding="utf-8")
    assert "scope" not in load_results(writer.path)["records"][0]
    resumed = ResultsWriter.resume(writer.path, dict(CONFIG))
    resumed.add_record(record(length=4000, perplexity=13.0, scope="overall"))
    assert [r["scope"] for r in load_results(writer.path)["records"]] == [None, "overall"]


def test_resume_with_a_different_config_names_the_keys(writer):
    changed = {**CONFIG, "lengths": [2000, 8000], "seed": 1}
    with pytest.raises(ResultsError, match=r"differs in lengths, seed \(lengths: file has") as caught:
        ResultsWriter.resume(writer.path, changed)
    assert "model" not in str(caught.value).split("(")[0]


def test_resume_compares_configs_as_json(writer):
    # A tuple in the caller's config is the list that was written.
    ResultsWriter.resume(writer.path, {**CONFIG, "lengths": (2000, 4000)})


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found: check the path"),
        ("", "not valid JSON"),
        ('{"format": "kvstress-results", "version": 1, "records": [', "not valid JSON.*cut short"),
        ("[1, 2]", "not a kvstress results file"),
        ('{"records": []}', "not a kvstress results file"),
        ('{"format": "lm-eval", "version": 1}', "not a kvstress results file"),
        ('{"format": "kvstress-results", "version": 2}', "version 2, newer.*upgrade kvstress"),
        ('{"format": "kvstress-results", "version": "1"}', "no valid \"version\""),
        ('{"format": "kvstress-results", "version": 1, "kind": "sweep", "config": {}}',
         "damaged: 'records'"),
    ],
)
def test_load_results_errors_name_the_fix(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        _write(path, content)
    with pytest.raises(ResultsError, match=message) as caught:
        load_results(path)
    assert "\n" not in str(caught.value)


def test_truncated_real_file_is_reported_as_not_json(writer):
    writer.add_samples([sample(i) for i in range(10)])
    text = writer.path.read_text()
    cut = _write(writer.path.with_name("cut.json"), text[: len(text) // 2])
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(cut)


def test_load_results_of_a_directory(tmp_path):
    with pytest.raises(ResultsError, match="is a directory"):
        load_results(tmp_path)


def test_environment_has_real_versions_and_reasons():
    env = environment(torch.device("cpu"))
    for key in (
        "date", "python", "platform", "hostname", "cpu_count", "cpu_model", "versions",
        "torch_cuda_version", "device", "device_name", "gpu_total_memory_bytes",
        "nvidia_driver_version", "git_commit", "git_dirty", "unavailable",
    ):
        assert key in env, key
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["transformers"] == importlib.metadata.version("transformers")
    assert env["versions"]["kvstress"] == importlib.metadata.version("kvstress")
    assert env["device"] == "cpu"
    assert env["cpu_count"] == os.cpu_count()
    assert env["gpu_total_memory_bytes"] is None
    assert env["unavailable"]["gpu_total_memory_bytes"] == "no CUDA device"
    if env["nvidia_driver_version"] is None:
        assert env["unavailable"]["nvidia_driver_version"]
    if env["git_commit"] is not None:  # this test suite usually runs from a checkout
        assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
        assert isinstance(env["git_dirty"], bool)
    else:
        assert env["unavailable"]["git_commit"]
    json.dumps(env, allow_nan=False)


def test_environment_outside_a_git_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(results, "__file__", str(tmp_path / "results.py"))
    env = environment(None)
    assert env["git_commit"] is None and env["git_dirty"] is None
    assert env["unavailable"]["git_commit"] == "kvstress is not running from a git checkout"
    assert env["device"] is None

"""Tests for kvstress.memory: sizes, samplers (CPU for real, CUDA/NVML faked), budget."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pynvml
import pytest
import torch

from kvstress.memory import (
    BudgetExceeded,
    MemoryBudget,
    MemorySampler,
    format_bytes,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000000", 1_000_000),
        ("2GB", 2 * 1000**3),
        ("2 gb", 2 * 1000**3),
        ("1.5 GiB", 1536 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("800M", 800 * 1024**2),
        ("4G", 4 * 1024**3),
        ("10KB", 10_000),
        ("10KiB", 10_240),
        ("0.5 kB", 500),
        ("1TB", 1000**4),
        ("64B", 64),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "2 XB", "-1GB", "1,5GB", "1.2.3G", "2 G B"])
def test_parse_size_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"KB/MB/GB.*KiB/MiB/GiB"):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(None) == "–"
    assert format_bytes(1_234_000_000) == "1.23 GB"
    assert format_bytes(5_500_000) == "5.50 MB"
    assert format_bytes(999) == "999 B"


def test_cpu_sampler_reports_rss_and_says_why_cuda_is_missing():
    sampler = MemorySampler(torch.device("cpu"))
    sample = sampler.sample(cache_bytes=1234)
    assert set(sample) == {
        "allocated_bytes", "reserved_bytes", "nvml_used_bytes", "rss_bytes", "cache_bytes", "cache_allocated_bytes",
    }
    assert sample["allocated_bytes"] is None
    assert sample["reserved_bytes"] is None
    assert sample["nvml_used_bytes"] is None
    assert sample["rss_bytes"] > 10 * 1024**2  # a Python process with torch loaded
    assert sample["cache_bytes"] == sample["cache_allocated_bytes"] == 1234  # no chunk room given: the same
    assert sampler.sample(cache_bytes=1234, cache_allocated_bytes=2000)["cache_allocated_bytes"] == 2000
    assert sampler.unavailable == {
        "allocated_bytes": "no CUDA device",
        "reserved_bytes": "no CUDA device",
        "nvml_used_bytes": "no CUDA device",
    }


def test_cpu_peaks_are_maxima_over_samples_and_reset():
    sampler = MemorySampler("cpu")
    sampler.sample(cache_bytes=100)
    sampler.sample(cache_bytes=300)
    sampler.sample()  # a sample without a cache size does not erase the peak
    peak = sampler.peak()
    assert peak["peak_cache_bytes"] == 300
    assert peak["peak_allocated_bytes"] is None and peak["peak_reserved_bytes"] is None
    assert peak["peak_nvml_used_bytes"] is None
    assert peak["peak_rss_bytes"] >= 10 * 1024**2
    sampler.reset_peak()
    assert sampler.peak()["peak_cache_bytes"] is None
    assert sampler.peak()["peak_rss_bytes"] is None
    sampler.sample(cache_bytes=7)
    assert sampler.peak()["peak_cache_bytes"] == 7


# --- CUDA and NVML, faked: the sampler's NVML logic runs on a CPU-only machine ----

GPU_UUIDS = ["GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000001"]


class _Uuid:
    """Like torch._C._CUuuid: str() gives the UUID without NVML's "GPU-" prefix."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch believes in cuda:0, which is NVML's GPU 1 (CUDA_VISIBLE_DEVICES=1)."""
    props = SimpleNamespace(
        uuid=_Uuid(GPU_UUIDS[1][4:]), pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0
    )
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1500)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 2500)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    return props


@pytest.fixture
def fake_nvml(monkeypatch):
    """Two GPUs, no MIG; memory used is 111 on GPU 0 and 222 on GPU 1."""
    used = {0: 111, 1: 222}
    bus_ids = {0: "00000000:1A:00.0", 1: "00000000:3B:00.0"}
    calls = {"memory_info": 0}

    def memory_info(handle):
        calls["memory_info"] += 1
        return SimpleNamespace(used=used[handle], total=10_000, free=10_000 - used[handle])

    def mig_mode(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: GPU_UUIDS[h])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPciInfo", lambda h: SimpleNamespace(busId=bus_ids[h]))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", mig_mode)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory_info)
    return calls


def test_nvml_handle_is_found_by_uuid_not_index(fake_cuda, fake_nvml):
    sampler = MemorySampler(torch.device("cuda"))
    sample = sampler.sample(cache_bytes=5)
    assert sample["allocated_bytes"] == 1000
    assert sample["reserved_bytes"] == 2000
    assert sample["nvml_used_bytes"] == 222  # NVML's GPU 1, though torch calls it cuda:0
    assert sampler.unavailable == {}
    peak = sampler.peak()
    assert peak["peak_allocated_bytes"] == 1500 and peak["peak_reserved_bytes"] == 2500
    assert peak["peak_nvml_used_bytes"] == 222


def test_nvml_handle_falls_back_to_pci_address(fake_cuda, fake_nvml):
    fake_cuda.uuid = _Uuid("cccccccc-0000-0000-0000-000000000009")  # matches no UUID
    assert MemorySampler("cuda:0").sample()["nvml_used_bytes"] == 222


def test_nvml_init_failure_is_recorded_never_raised(fake_cuda, fake_nvml, monkeypatch):
    def broken_init():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", broken_init)
    sampler = MemorySampler("cuda:0")
    sample = sampler.sample()
    assert sample["nvml_used_bytes"] is None
    assert sample["allocated_bytes"] == 1000  # the other measures still work
    assert sampler.unavailable["nvml_used_bytes"].startswith("NVML init failed: ")
    assert "Driver Not Loaded" in sampler.unavailable["nvml_used_bytes"]
    assert sampler.peak()["peak_nvml_used_bytes"] is None


def test_nvml_permission_error_is_recorded(fake_cuda, fake_nvml, monkeypatch):
    def no_permission(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", no_permission)
    sampler = MemorySampler("cuda:0")
    assert sampler.sample()["nvml_used_bytes"] is None
    assert sampler.unavailable["nvml_used_bytes"].startswith("no permission: ")


def test_nvml_failing_mid_run_stops_asking(fake_cuda, fake_nvml, monkeypatch):
    sampler = MemorySampler("cuda:0")
    assert sampler.sample()["nvml_used_bytes"] == 222

    def gone(handle):
        fake_nvml["memory_info"] += 1
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", gone)
    assert sampler.sample()["nvml_used_bytes"] is None
    calls = fake_nvml["memory_info"]
    assert sampler.sample()["nvml_used_bytes"] is None
    assert fake_nvml["memory_info"] == calls  # not retried on every forward
    assert "GPU is lost" in sampler.unavailable["nvml_used_bytes"]
    assert sampler.peak()["peak_nvml_used_bytes"] == 222  # what was measured stays


def test_mig_instance_uses_its_own_handle(fake_cuda, fake_nvml, monkeypatch):
    mig_uuid = "MIG-dddddddd-0000-0000-0000-000000000000"
    fake_cuda.uuid = _Uuid(mig_uuid[4:])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", lambda h: (1, 1) if h == 1 else (0, 0))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxMigDeviceCount", lambda h: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigDeviceHandleByIndex", lambda h, i: "mig")
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetUUID", lambda h: mig_uuid if h == "mig" else GPU_UUIDS[h]
    )
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo",
        lambda h: SimpleNamespace(used=42 if h == "mig" else 999),
    )
    assert MemorySampler("cuda:0").sample()["nvml_used_bytes"] == 42


def test_mig_parent_memory_is_not_reported_as_ours(fake_cuda, fake_nvml, monkeypatch):
    fake_cuda.uuid = _Uuid("eeeeeeee-0000-0000-0000-000000000000")  # a MIG UUID NVML can't list
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", lambda h: (1, 1))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxMigDeviceCount", lambda h: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigDeviceHandleByIndex", lambda h, i: f"mig{h}")
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetUUID",
        lambda h: f"MIG-other-{h}" if isinstance(h, str) else GPU_UUIDS[h],
    )
    sampler = MemorySampler("cuda:0")
    assert sampler.sample()["nvml_used_bytes"] is None
    assert sampler.unavailable["nvml_used_bytes"] == (
        "MIG device: NVML reports the parent GPU's memory only"
    )


def test_pynvml_missing_is_recorded(fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import now fails
    sampler = MemorySampler("cuda:0")
    assert sampler.sample()["nvml_used_bytes"] is None
    assert sampler.unavailable["nvml_used_bytes"].startswith("pynvml not installed")


# --- budget ------------------------------------------------------------------------


def test_budget_exceeded_is_an_out_of_memory_error_on_cpu_torch():
    budget = MemoryBudget(limit_bytes=1_000_000_000, base_bytes=900_000_000)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        budget.check({"allocated_bytes": None, "cache_bytes": 300_000_000})
    error = caught.value
    assert isinstance(error, BudgetExceeded)
    assert error.used_bytes == 1_200_000_000 and error.limit_bytes == 1_000_000_000
    assert str(error) == (
        "memory budget exceeded: 1.20 GB used (weights + KV cache) > 1.00 GB --max-memory"
    )


def test_runner_style_except_catches_budget_exceeded():
    try:
        MemoryBudget(10).check({"allocated_bytes": 11, "cache_bytes": 0})
    except torch.OutOfMemoryError as error:  # the runner's one OOM path
        caught = error
    assert isinstance(caught, BudgetExceeded)


def test_budget_arithmetic():
    budget = MemoryBudget(limit_bytes=1000, base_bytes=600)
    # CPU: weights + cache, and RSS is ignored however large it is.
    assert budget.check({"allocated_bytes": None, "cache_bytes": 400, "rss_bytes": 10**12}) == 1000
    with pytest.raises(BudgetExceeded):
        budget.check({"allocated_bytes": None, "cache_bytes": 401})
    # What the cache allocated counts, its room for a prefill chunk included.
    with pytest.raises(BudgetExceeded):
        budget.check({"allocated_bytes": None, "cache_bytes": 300, "cache_allocated_bytes": 401})
    # CUDA: torch's allocated bytes already include weights and cache.
    assert budget.check({"allocated_bytes": 1000, "cache_bytes": 900}) == 1000
    with pytest.raises(BudgetExceeded, match=r"torch allocated"):
        budget.check({"allocated_bytes": 1001, "cache_bytes": 0})


def test_budget_needs_a_measure():
    with pytest.raises(ValueError, match="cache_bytes"):
        MemoryBudget(1000).check({"allocated_bytes": None, "cache_bytes": None})
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


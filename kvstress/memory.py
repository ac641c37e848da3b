"""Memory measurement for kvstress: samplers, the --max-memory budget, sizes.

The runner samples memory after every forward, so :class:`MemorySampler` must be
cheap and must never fail a run. It reports memory three ways and says which is
which:

    allocated_bytes   tensor bytes held by torch's CUDA caching allocator
    reserved_bytes    bytes the allocator has reserved from the driver
    nvml_used_bytes   device-wide used memory as NVML sees it (other processes too)
    rss_bytes         this process's resident memory (the only measure on CPU)
    cache_bytes       the KV cache's own size between forwards, passed in by the caller
    cache_allocated_bytes  the same with a compressed cache's room for a forward's new
                      tokens (what the budget counts)

A measure that cannot be taken is ``None`` and :attr:`MemorySampler.unavailable`
says why; it is never reported as 0.

:class:`MemoryBudget` turns a sample into a simulated out-of-memory error, so that
an OOM study can run on a machine bigger (or smaller) than the one it models.
"""

from __future__ import annotations

import psutil
import torch

from .sizes import format_bytes, parse_size  # noqa: F401 - read from here too


def _bare_uuid(text: str) -> str:
    """NVML spells UUIDs "GPU-…" or "MIG-…", torch without a prefix: compare the rest."""
    text = text.decode() if isinstance(text, bytes) else str(text)
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _parse_nvml_bus_id(bus_id: str | bytes) -> tuple[int, int, int]:
    """NVML's "00000000:3B:00.0" → (domain, bus, device)."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    domain, bus, rest = text.split(":")
    return (int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16))


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class MemorySampler:
    """Cheap per-forward memory samples for one torch device, plus their peaks.

    Nothing here synchronizes the device: a sample reads counters the allocator
    and the driver already keep, so sampling every forward does not change the
    timing it sits next to.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._process = psutil.Process()
        self._unavailable: dict[str, str] = {}
        if not self._cuda:
            self._unavailable["allocated_bytes"] = "no CUDA device"
            self._unavailable["reserved_bytes"] = "no CUDA device"
        self._nvml = None  # the pynvml module, once a handle was found
        self._nvml_handle = None
        self._open_nvml()
        self._peak_nvml: int | None = None
        self._peak_rss: int | None = None
        self._peak_cache: int | None = None

    # -- NVML -------------------------------------------------------------------

    def _nvml_off(self, reason: str) -> None:
        self._nvml = None
        self._nvml_handle = None
        self._unavailable["nvml_used_bytes"] = reason

    def _open_nvml(self) -> None:
        """Find the NVML handle of this torch device once; on any failure, record why."""
        if not self._cuda:
            self._nvml_off("no CUDA device")
            return
        if torch.version.hip is not None:
            self._nvml_off("not an NVIDIA GPU (ROCm): NVML does not apply")
            return
        try:
            import pynvml
        except ImportError:
            self._nvml_off("pynvml not installed (pip install nvidia-ml-py)")
            return
        try:
            pynvml.nvmlInit()
        except Exception as error:
            self._nvml_off(f"NVML init failed: {_describe(error)}")
            return
        try:
            handle, reason = self._find_handle(pynvml)
            if handle is not None:
                pynvml.nvmlDeviceGetMemoryInfo(handle)  # fail now, not on the first sample
        except pynvml.NVMLError_NoPermission as error:
            self._nvml_off(f"no permission: {_describe(error)}")
            return
        except Exception as error:
            self._nvml_off(f"NVML query failed: {_describe(error)}")
            return
        if handle is None:
            self._nvml_off(reason)
            return
        self._nvml = pynvml
        self._nvml_handle = handle

    def _find_handle(self, pynvml):
        """Return (handle, reason) for this torch device.

        CUDA_VISIBLE_DEVICES renumbers devices for CUDA but not for NVML, so the
        device is matched by UUID (which also names a MIG instance), then by PCI
        address, never by index.
        """
        props = torch.cuda.get_device_properties(self.device)
        uuid = _bare_uuid(str(props.uuid)) if getattr(props, "uuid", None) is not None else None
        pci = None
        if hasattr(props, "pci_bus_id"):
            pci = (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)

        pci_match = None
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            if uuid is not None and _bare_uuid(pynvml.nvmlDeviceGetUUID(handle)) == uuid:
                return handle, ""
            mig_handles = self._mig_handles(pynvml, handle)
            for mig_handle in mig_handles:
                if uuid is not None and _bare_uuid(pynvml.nvmlDeviceGetUUID(mig_handle)) == uuid:
                    # The MIG instance's own handle reports that instance's memory.
                    return mig_handle, ""
            if pci is not None and _parse_nvml_bus_id(pynvml.nvmlDeviceGetPciInfo(handle).busId) == pci:
                pci_match = (handle, bool(mig_handles))

        if pci_match is None:
            return None, f"no NVML device matches torch device {self.device} (uuid {uuid})"
        handle, in_mig_mode = pci_match
        if in_mig_mode:
            # The parent GPU's numbers include every other instance on it: not ours.
            return None, "MIG device: NVML reports the parent GPU's memory only"
        return handle, ""

    @staticmethod
    def _mig_handles(pynvml, handle) -> list:
        """MIG instance handles under a GPU; [] when MIG is off or unsupported."""
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
        except pynvml.NVMLError:
            return []
        if current != pynvml.NVML_DEVICE_MIG_ENABLE:
            return []
        handles = []
        for index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                handles.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index))
            except pynvml.NVMLError:
                continue  # an empty slot
        return handles

    def _nvml_used(self) -> int | None:
        if self._nvml_handle is None:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
        except Exception as error:
            # Stop asking: a failing call every forward would cost time and say nothing new.
            self._nvml_off(f"NVML query failed during the run: {_describe(error)}")
            return None

    # -- sampling ---------------------------------------------------------------

    def sample(self, cache_bytes: int | None = None, cache_allocated_bytes: int | None = None) -> dict:
        """Read every measure now; the KV cache's sizes are passed through: cache_bytes what it
        holds between forwards, cache_allocated_bytes with its room for a forward's tokens
        (the same as cache_bytes where not given)."""
        if cache_allocated_bytes is None:
            cache_allocated_bytes = cache_bytes
        allocated = reserved = None
        if self._cuda:
            allocated = torch.cuda.memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        nvml_used = self._nvml_used()
        rss = self._process.memory_info().rss

        if nvml_used is not None:
            self._peak_nvml = nvml_used if self._peak_nvml is None else max(self._peak_nvml, nvml_used)
        self._peak_rss = rss if self._peak_rss is None else max(self._peak_rss, rss)
        if cache_bytes is not None:
            self._peak_cache = (
                cache_bytes if self._peak_cache is None else max(self._peak_cache, cache_bytes)
            )
        return {
            "allocated_bytes": allocated,
            "reserved_bytes": reserved,
            "nvml_used_bytes": nvml_used,
            "rss_bytes": rss,
            "cache_bytes": cache_bytes,
            "cache_allocated_bytes": cache_allocated_bytes,
        }

    def peak(self) -> dict:
        """Peaks since the last reset_peak().

        The torch peaks come from the allocator and so catch the short spikes
        between samples; NVML, RSS and cache peaks are maxima over the samples.
        """
        peak_allocated = peak_reserved = None
        if self._cuda:
            peak_allocated = torch.cuda.max_memory_allocated(self.device)
            peak_reserved = torch.cuda.max_memory_reserved(self.device)
        return {
            "peak_allocated_bytes": peak_allocated,
            "peak_reserved_bytes": peak_reserved,
            "peak_nvml_used_bytes": self._peak_nvml,
            "peak_rss_bytes": self._peak_rss,
            "peak_cache_bytes": self._peak_cache,
        }

    def peak_record(self) -> dict:
        """The peaks under the names a results record uses (the cache's peak is not one of them)."""
        peak = self.peak()
        del peak["peak_cache_bytes"]
        return peak

    def reset_peak(self) -> None:
        """Start a new peak window (e.g. at each method or checkpoint)."""
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_nvml = self._peak_rss = self._peak_cache = None

    @property
    def unavailable(self) -> dict[str, str]:
        """For each sample measure that is None, why (keys are the sample's names)."""
        return dict(self._unavailable)


class BudgetExceeded(torch.OutOfMemoryError):
    """A simulated out-of-memory: the run went over --max-memory.

    It is a torch.OutOfMemoryError on purpose, so that the runner's one
    ``except torch.OutOfMemoryError`` records real and simulated OOM alike.
    """

    def __init__(self, used_bytes: int, limit_bytes: int, measure: str) -> None:
        self.used_bytes = used_bytes
        self.limit_bytes = limit_bytes
        self.measure = measure
        super().__init__(
            f"memory budget exceeded: {format_bytes(used_bytes)} used ({measure}) "
            f"> {format_bytes(limit_bytes)} --max-memory"
        )


class MemoryBudget:
    """Enforce --max-memory against samples from MemorySampler.

    On CUDA the budgeted measure is torch's allocated bytes. Elsewhere it is the
    tracked bytes, base_bytes (the runner passes the model's weight bytes) plus
    the KV cache's bytes: RSS moves with the allocator and the OS, so a budget on
    it would not give the same answer twice.
    """

    def __init__(self, limit_bytes: int, base_bytes: int = 0) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"the memory budget must be positive, got {limit_bytes} bytes")
        self.limit_bytes = int(limit_bytes)
        self.base_bytes = int(base_bytes)

    def measure(self, sample: dict) -> tuple[int, str]:
        """The budgeted bytes of a sample and the name of the measure used."""
        if sample.get("allocated_bytes") is not None:
            return sample["allocated_bytes"], "torch allocated"
        # What the cache has allocated, its room for a prefill chunk included: that is what takes memory.
        cache = sample.get("cache_allocated_bytes")
        cache = sample.get("cache_bytes") if cache is None else cache
        if cache is None:
            raise ValueError(
                "a memory budget without CUDA needs cache_bytes in the sample: "
                "pass the cache's size to MemorySampler.sample(cache_bytes)"
            )
        return self.base_bytes + cache, "weights + KV cache"

    def check(self, sample: dict) -> int:
        """Return the budgeted bytes; raise BudgetExceeded when they exceed the limit."""
        used, name = self.measure(sample)
        if used > self.limit_bytes:
            raise BudgetExceeded(used, self.limit_bytes, name)
        return used

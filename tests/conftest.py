"""Tiny random-weight HF models shared by the tests (CPU, fp32, seconds to build)."""

import pytest
import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=3, pad_token_id=0, bos_token_id=1)


def tiny_model(family: str = "qwen2", seed: int = 0, **overrides):
    """A tiny causal LM of the given family ('qwen2', 'llama', 'mistral', 'qwen2-sliding')."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif family == "qwen2-sliding":  # alternate full / sliding-window layers via max_window_layers
        kwargs.update(use_sliding_window=True, sliding_window=4, max_window_layers=3)
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **kwargs))
    else:
        raise ValueError(family)
    return model.eval()


#: Hybrid models whose cache holds recurrent (Mamba / gated delta rule) layers beside attention layers.
HYBRIDS = {
    "bamba": lambda kw: transformers.BambaConfig(**kw, attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_d_head=16,
                                                 mamba_d_state=8, mamba_chunk_size=8),
    "jamba": lambda kw: transformers.JambaConfig(**kw, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100,
                                                 mamba_d_state=8),
    "granitemoehybrid": lambda kw: transformers.GraniteMoeHybridConfig(
        **kw, layer_types=["mamba", "attention"] * (kw["num_hidden_layers"] // 2), mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, num_local_experts=2, num_experts_per_tok=1),
    "qwen3_next": lambda kw: transformers.Qwen3NextConfig(
        **kw, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, full_attention_interval=2),
}


def tiny_hybrid(name: str, num_hidden_layers: int = 4, seed: int = 0, **overrides):
    """A tiny random-weight hybrid causal LM (`HYBRIDS`), in eval mode."""
    torch.manual_seed(seed)
    kwargs = {**TINY, "num_hidden_layers": num_hidden_layers, **overrides}
    kwargs.pop("max_position_embeddings")
    return transformers.AutoModelForCausalLM.from_config(HYBRIDS[name](kwargs)).eval()


@pytest.fixture
def qwen():
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The embedded toy task (random-weight 28-layer model + data) written once per test session."""
    from nested_reft.synthetic import build_toy

    out = tmp_path_factory.mktemp("toy-session")
    build_toy(out, seed=0, num_train=48, num_test=16)
    return out

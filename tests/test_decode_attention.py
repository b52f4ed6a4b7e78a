from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_model
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from nested_reft import decode_attention as da
from nested_reft import rollout
from nested_reft.rollout import SamplingConfig, generate


def qkv(rows=5, heads=4, kv_heads=2, q_len=1, context=7, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, heads, q_len, dim, generator=g), torch.randn(rows, kv_heads, context, dim, generator=g),
            torch.randn(rows, kv_heads, context, dim, generator=g))


class Module:  # what SDPA's function reads from the attention module
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "broadcast"])
def test_one_query_equals_sdpa(mask_kind):
    q, k, v = qkv()
    keep = torch.ones(5, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., :3] = keep[4, ..., :1] = False  # left padding
    mask = {"none": None, "bool": keep, "additive": torch.zeros(5, 1, 1, 7).masked_fill(~keep, float("-inf")),
            "broadcast": keep[:1]}[mask_kind]
    ref, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3)
    got, _ = da.decode_attention(Module(), q, k, v, mask, scaling=0.3)
    assert got.shape == ref.shape == (5, 1, 4, 8)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_anything_but_a_plain_float32_step_goes_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(da, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or ("sdpa", None))
    q, k, v = qkv()
    unusual = [
        (qkv(q_len=3), None, {}),  # the prefill
        ((q.bfloat16(), k.bfloat16(), v.bfloat16()), None, {}),  # rounding the scores to bf16 would differ
        ((q, k, v), torch.zeros(5, 4, 1, 7), {}),  # a per-head (ALiBi) mask
        ((q, k, v), None, {"dropout": 0.1}),
        ((q, k, v), None, {"position_bias": torch.zeros(5, 4, 1, 7)}),
        ((q, k, v), None, {"softcap": 30.0}),
        ((q, k, v), None, {"s_aux": torch.zeros(4)}),
        ((q, k, v), None, {"indices": torch.zeros(5, 1, 3, dtype=torch.long)}),  # sparse attention's top-k
    ]
    for tensors, mask, kwargs in unusual:
        assert da.decode_attention(Module(), *tensors, mask, **kwargs)[0] == "sdpa", kwargs
    assert len(calls) == len(unusual)
    assert da.decode_attention(Module(), q, k, v, None, sliding_window=4, position_ids=None)[0] != "sdpa"


SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=3, pad_token_id=0, bos_token_id=1)


def build(config):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


MODELS = {
    "qwen2": lambda: tiny_model("qwen2"), "llama": lambda: tiny_model("llama"),
    "mistral": lambda: tiny_model("mistral"), "qwen2-sliding": lambda: tiny_model("qwen2-sliding"),
    "qwen3": lambda: build(transformers.Qwen3Config(**SMALL, head_dim=16)),
    "phi3": lambda: build(transformers.Phi3Config(**SMALL)),
    "olmo2": lambda: build(transformers.Olmo2Config(**SMALL)),
    "gemma3_text": lambda: build(transformers.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=4)),
    "gpt_neox": lambda: build(transformers.GPTNeoXConfig(**{**SMALL, "num_key_value_heads": 4})),
    "gpt2": lambda: build(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, eos_token_id=3,
                                                  pad_token_id=0, bos_token_id=1)),
    "opt": lambda: build(transformers.OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                                num_attention_heads=4, word_embed_proj_dim=32, eos_token_id=3,
                                                pad_token_id=0, bos_token_id=1)),
}


def test_every_switched_family_is_checked_here():
    assert {MODELS[name]().config.model_type for name in MODELS} == set(da.FAMILIES)


@pytest.mark.parametrize("family", MODELS)
def test_generate_samples_what_sdpa_samples(family, monkeypatch):
    model = MODELS[family]()
    assert model.config._attn_implementation == "sdpa"
    seen = []
    original = da.decode_attention
    monkeypatch.setitem(da.AttentionInterface._global_mapping, da.NAME,
                        lambda *a, **kw: seen.append(a[1].shape[2]) or original(*a, **kw))
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # left padding
    cfg = SamplingConfig(max_new_tokens=12)

    def run():
        return generate(model, prompts, 2, cfg, 3, 0, skip=(1,), generator=torch.Generator().manual_seed(0))

    fallbacks = []
    fallback = da.sdpa_attention_forward
    monkeypatch.setattr(da, "sdpa_attention_forward", lambda module, query, *a, **kw: fallbacks.append(
        (query.shape[2], sorted(k for k, v in kw.items() if v is not None))) or fallback(module, query, *a, **kw))
    got = run()
    assert 1 in seen  # the one-token steps went through it, and none fell back to SDPA
    assert all(q_len > 1 for q_len, _ in fallbacks), fallbacks
    monkeypatch.setattr(rollout, "single_query_attention", lambda m: nullcontext())
    ref = run()
    assert torch.equal(got.completion_ids, ref.completion_ids)
    torch.testing.assert_close(got.behavior_logprobs, ref.behavior_logprobs, rtol=0, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_the_decode_loop_runs_through_it(monkeypatch):
    seen = []
    original = da.decode_attention

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setitem(da.AttentionInterface._global_mapping, da.NAME, spy)
    generate(tiny_model("qwen2"), [[5, 6, 7]], 2, SamplingConfig(max_new_tokens=4), None, 0,
             generator=torch.Generator().manual_seed(0))
    assert seen == [3] * 6 + [1] * 6 * 3  # the prefill (3 queries) in 6 layers, then 3 one-token steps


def test_other_families_and_dtypes_keep_sdpa():
    falcon = build(transformers.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, alibi=True))
    bf16 = tiny_model("qwen2").to(torch.bfloat16)
    for model in (falcon, bf16):
        with da.single_query_attention(model):
            assert model.config._attn_implementation == "sdpa"


def test_only_cpu_sdpa_models_switch_and_the_setting_is_restored():
    model = tiny_model("qwen2")
    with pytest.raises(RuntimeError):
        with da.single_query_attention(model):
            assert model.config._attn_implementation == da.NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with da.single_query_attention(model):
        assert model.config._attn_implementation == "eager"

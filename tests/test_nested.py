import pytest
import torch
from conftest import tiny_hybrid, tiny_model
from torch import nn

from nested_reft import skip_layers
from nested_reft.nested import build_truncated_model, find_layers, nesting_problem, num_layers

FAMILIES = ["qwen2", "llama", "mistral", "qwen2-sliding"]
SKIPS = [(0,), (2, 4), (0, 5), (1, 2, 3), (5,)]


def padded_batch():
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("skip", SKIPS)
def test_nested_forward_equals_explicit_smaller_model(family, skip):
    model = tiny_model(family)
    small = build_truncated_model(model, skip)
    assert num_layers(small) == 6 - len(skip)
    ids = torch.randint(4, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), skip_layers(model, skip):
        nested = model(ids).logits
    reference = small(ids).logits
    torch.testing.assert_close(nested, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("skip", [(0,), (1, 4)])
def test_generate_inside_block_matches_smaller_model_with_left_padding(family, skip):
    model = tiny_model(family)
    small = build_truncated_model(model, skip)
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with skip_layers(model, skip):
        nested = model.generate(ids, **kw)
    assert torch.equal(nested, small.generate(ids, **kw))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen2-sliding"])
def test_cached_generation_equals_no_cache_recompute(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with skip_layers(model, (0, 3)):  # window 4 < 16 tokens: sliding layers really slide
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_layers_truly_skipped_and_weights_shared(qwen):
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, layer in enumerate(find_layers(qwen).layers)]
    full_ptrs = {p.data_ptr() for p in qwen.parameters()}
    with torch.no_grad(), skip_layers(qwen, (0, 2)):
        qwen(torch.tensor([[5, 6, 7]]))
        assert len(qwen.model.layers) == 4 and qwen.config.num_hidden_layers == 4
        assert {p.data_ptr() for p in qwen.parameters()} <= full_ptrs  # no copy
    for h in hooks:
        h.remove()
    assert calls == [1, 3, 4, 5]


def test_full_model_bit_identical_after_block_also_on_error(qwen):
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    layers, cfg = find_layers(qwen).layers, qwen.config.to_dict()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = qwen(ids).logits
        with pytest.raises(RuntimeError, match="boom"), skip_layers(qwen, (1, 2)):
            qwen(ids)
            raise RuntimeError("boom")
        after = qwen(ids).logits
    assert torch.equal(ref, after)
    assert find_layers(qwen).layers is layers and qwen.config.to_dict() == cfg
    assert [layer.self_attn.layer_idx for layer in qwen.model.layers] == list(range(6))
    assert all(torch.equal(before[k], v) for k, v in qwen.state_dict().items())


def test_empty_skip_is_the_full_model(qwen):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = qwen(ids).logits
        with skip_layers(qwen, ()):
            assert torch.equal(qwen(ids).logits, ref)


def test_bad_skip_sets_are_named(qwen):
    with pytest.raises(IndexError, match="skip index 6 is out of range for Qwen2ForCausalLM"):
        with skip_layers(qwen, (1, 6)):
            pass
    with pytest.raises(ValueError, match="repeats layer index 2"):
        with skip_layers(qwen, (2, 2)):
            pass
    with pytest.raises(IndexError, match="skip index -1"):
        with skip_layers(qwen, (-1,)):
            pass


def test_model_without_layer_list_is_named():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="NoLayers has no recognisable transformer layer list"):
        with skip_layers(NoLayers(), (0,)):
            pass


def test_the_nested_view_works_through_a_peft_wrapper():
    """find_layers finds the decoder layers inside a LoRA PeftModel (the same module objects), skip_layers nests
    the wrapped model (adapters included) exactly as it nests the unwrapped one and restores it, and the Block
    Influence meter measures through the wrapper."""
    peft = pytest.importorskip("peft")
    from nested_reft.importance import block_influence

    inner = tiny_model("qwen2")
    wrapped = peft.get_peft_model(inner, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert find_layers(wrapped).layers is inner.model.layers and num_layers(wrapped) == 6
    ids, mask = padded_batch()
    with torch.no_grad():
        full = wrapped(input_ids=ids, attention_mask=mask).logits
        with skip_layers(wrapped, (1, 4)):
            assert len(inner.model.layers) == 4 and wrapped.config.num_hidden_layers == 4
            nested = wrapped(input_ids=ids, attention_mask=mask).logits
        with skip_layers(inner, (1, 4)):
            want = inner(input_ids=ids, attention_mask=mask).logits  # the adapters live in inner's layers
        with wrapped.disable_adapter(), skip_layers(wrapped, (1, 4)):
            base = wrapped(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(wrapped(input_ids=ids, attention_mask=mask).logits, full)  # restored
    assert torch.equal(nested, want) and not torch.allclose(nested, full) and not torch.allclose(nested, base)
    assert len(inner.model.layers) == 6 and wrapped.config.num_hidden_layers == 6
    assert block_influence(wrapped, ids, mask, mask) == block_influence(inner, ids, mask, mask)


@pytest.mark.parametrize("name", ["qwen3_next", "granitemoehybrid"])
@pytest.mark.parametrize("skip", [(1,), (2,)])
def test_hybrid_nested_rollouts_equal_the_explicit_smaller_model(name, skip):
    from nested_reft.rollout import SamplingConfig, generate

    model = tiny_hybrid(name)
    assert nesting_problem(model) is None
    small = build_truncated_model(model, skip).eval()
    prompts, cfg = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], SamplingConfig(max_new_tokens=8, min_new_tokens=0)
    nested = generate(model, prompts, 2, cfg, list(range(3, 20)), 0, skip=skip, generator=torch.Generator().manual_seed(0))
    reference = generate(small, prompts, 2, cfg, list(range(3, 20)), 0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nested.completion_ids, reference.completion_ids)
    torch.testing.assert_close(nested.behavior_logprobs, reference.behavior_logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["jamba", "bamba"])
def test_a_model_whose_layer_list_is_read_only_is_refused_by_name(name):
    model = tiny_hybrid(name)
    problem = nesting_problem(model)
    assert "cannot be nested" in problem and "`layer_types`" in problem
    layers, config = find_layers(model).layers, dict(model.config.to_dict())
    with pytest.raises(ValueError, match="cannot be nested"):
        with skip_layers(model, (1,)):
            pass
    assert find_layers(model).layers is layers and model.config.to_dict() == config  # untouched
    with pytest.raises(ValueError, match="cannot be nested"):
        build_truncated_model(model, (1,))
    with skip_layers(model, ()):  # the full model needs no nesting
        pass

"""logprobs.py: the chunked head + log-softmax equals the unfused reference (values, entropy, gradients),
saves no [N, L, V] tensor, and scores through an HF model's own forward (tiny Qwen2/Llama, PEFT)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                          GraniteForCausalLM)

from nested_reft.logprobs import chunked_logprobs, default_chunk_tokens, scored_head, supports_scored_head
from nested_reft.objectives import token_logprobs
from conftest import TINY, tiny_model

BANNED = torch.tensor([2, 5])


def reference(hidden, weight, bias, labels, **kw):
    """The unfused path: full logits [N, L, V], then objectives.token_logprobs."""
    return token_logprobs(F.linear(hidden, weight, bias), labels, kw.get("temperature", 1.0), kw.get("banned"),
                          kw.get("banned_until", 0), entropy=kw.get("entropy", False))


def random_case(n=3, length=5, width=8, vocab=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, length, width, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, width, generator=gen, dtype=dtype) / width ** 0.5
    bias = torch.randn(vocab, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (n, length), generator=gen)
    return hidden, weight, bias, labels


def grads(fn, tensors, upstream):
    """Gradients of sum(upstream * fn(*tensors)) w.r.t. each tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(upstream)  # fine where out is -inf (a banned label): its gradient is finite
    return out.detach(), [leaf.grad for leaf in leaves]


def test_gradcheck_float64_with_temperature_and_ban():
    hidden, weight, bias, labels = random_case(n=2, length=3, width=4, vocab=7, dtype=torch.float64)
    labels[:, :2] = torch.tensor([[1, 6], [0, 3]])  # nothing banned is scored where the ban holds (finite)

    def fn(h, w, b):
        return chunked_logprobs(h, w, b, labels, temperature=0.7, banned=BANNED, banned_until=2, chunk_tokens=2)

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (hidden, weight, bias)])


@pytest.mark.parametrize("chunk", [1, 4, 7, None])
def test_matches_reference_values_entropy_and_grads(chunk):
    hidden, weight, bias, labels = random_case()
    labels[1, 0] = 5  # a banned label where the ban holds: -inf in both, and a finite gradient
    kw = dict(temperature=1.3, banned=BANNED, banned_until=3)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    want, want_grads = grads(lambda h, w, b: reference(h, w, b, labels, **kw), (hidden, weight, bias), upstream)
    got, got_grads = grads(lambda h, w, b: chunked_logprobs(h, w, b, labels, chunk_tokens=chunk, **kw),
                           (hidden, weight, bias), upstream)
    assert got.dtype == torch.float32 and got[1, 0] == float("-inf")
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    _, want_entropy = reference(hidden, weight, bias, labels, entropy=True, **kw)
    logp, entropy = chunked_logprobs(hidden, weight, bias, labels, entropy=True, chunk_tokens=chunk, **kw)
    torch.testing.assert_close(entropy, want_entropy)
    assert not entropy.requires_grad


def test_without_bias_and_without_ban():
    hidden, weight, _, labels = random_case(seed=2)
    upstream = torch.ones(labels.shape)
    want, want_grads = grads(lambda h, w: reference(h, w, None, labels), (hidden, weight), upstream)
    got, got_grads = grads(lambda h, w: chunked_logprobs(h, w, None, labels, chunk_tokens=3), (hidden, weight),
                           upstream)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_bf16_hidden_is_upcast_per_chunk():
    hidden, weight, bias, labels = random_case(seed=3)
    hidden = hidden.bfloat16()
    kw = dict(temperature=0.6, banned=BANNED, banned_until=2)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    want, want_grads = grads(lambda h, w, b: reference(h.float(), w, b, labels, **kw), (hidden, weight, bias), upstream)
    got, got_grads = grads(lambda h, w, b: chunked_logprobs(h, w, b, labels, chunk_tokens=4, **kw),
                           (hidden, weight, bias), upstream)
    assert got.dtype == torch.float32 and got_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads[0], want_grads[0])
    for g, w in zip(got_grads[1:], want_grads[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_saves_no_full_logits():
    """Everything autograd keeps is far smaller than the [N, L, V] logits."""
    hidden, weight, bias, labels = random_case(n=4, length=16, width=8, vocab=500)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_logprobs(hidden.requires_grad_(), weight.requires_grad_(), bias, labels, chunk_tokens=8)
    assert saved and sum(saved) < 4 * 16 * 500 / 4


def test_default_chunk_and_bad_input():
    assert default_chunk_tokens(151936) == 220 and default_chunk_tokens(10 ** 9) == 1
    hidden, weight, bias, labels = random_case()
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(hidden, weight, bias, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        chunked_logprobs(hidden, weight, bias, labels[:, 1:])


# ---- through a model's forward ------------------------------------------------------------------


def batch(length=6, prompt=4, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, TINY["vocab_size"], (n, prompt + length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions), ids[:, prompt:]


def model_pass(model, inputs, labels, scored: bool, **kw):
    """(log-probs, entropy, parameter grads) of sum(log-probs), scored through the head or the reference way."""
    model.zero_grad()
    length = labels.shape[1]
    if scored:
        with scored_head(model, labels, entropy=True, **kw) as scorer:
            out = model(**inputs, use_cache=False, logits_to_keep=length + 1)
            logp, entropy = scorer.result()
            assert out.logits is logp
    else:
        logits = model(**inputs, use_cache=False, logits_to_keep=length + 1).logits[:, :-1]
        logp, entropy = token_logprobs(logits, labels, kw.get("temperature", 1.0), kw.get("banned"),
                                       kw.get("banned_until", 0), entropy=True)
    logp.sum().backward()
    return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, tied", [("qwen2", False), ("llama", False), ("qwen2", True)])
def test_scored_head_matches_full_logits(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    inputs, labels = batch()
    labels[1, 0] = 3  # EOS at a banned position
    kw = dict(temperature=0.8, banned=torch.tensor([3]), banned_until=2, chunk_tokens=5)
    want, want_entropy, want_grads = model_pass(model, inputs, labels, scored=False, **kw)
    got, got_entropy, got_grads = model_pass(model, inputs, labels, scored=True, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_entropy, want_entropy)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_head_is_restored_after_an_exception():
    model = tiny_model("qwen2")
    head = model.get_output_embeddings()
    inputs, labels = batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        with scored_head(model, labels):
            model(**inputs, use_cache=False)  # every position kept: the head refuses
    assert model.lm_head is head and model.get_output_embeddings() is head
    with pytest.raises(KeyError):
        with scored_head(model, labels):
            raise KeyError("boom")
    assert model.lm_head is head


def test_a_forward_that_skips_the_head_is_an_error():
    model = tiny_model("qwen2")
    with scored_head(model, batch()[1]) as scorer:
        pass
    with pytest.raises(RuntimeError, match="0 times"):
        scorer.result()


def test_supports_scored_head_refuses_logit_transforms():
    small = {k: v for k, v in TINY.items() if k != "max_position_embeddings"}
    small.update(num_hidden_layers=1, head_dim=8)
    assert supports_scored_head(tiny_model("qwen2")) and supports_scored_head(tiny_model("llama"))
    assert not supports_scored_head(Gemma2ForCausalLM(Gemma2Config(**small)))  # final_logit_softcapping 30
    assert supports_scored_head(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=None)))
    assert not supports_scored_head(CohereForCausalLM(CohereConfig(**small)))  # logit_scale defaults to 0.0625
    assert supports_scored_head(GraniteForCausalLM(GraniteConfig(**small)))  # logits_scaling 1.0
    assert not supports_scored_head(GraniteForCausalLM(GraniteConfig(**small, logits_scaling=4.0)))
    hooked = tiny_model("qwen2")
    hooked.lm_head.register_forward_hook(lambda *a: None)
    assert not supports_scored_head(hooked)
    with pytest.raises(ValueError, match="hooks"):
        with scored_head(hooked, batch()[1]):
            pass


def test_scores_through_a_peft_wrapper():
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen2")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: LoRA grads
    model = peft.get_peft_model(base, lora)
    assert supports_scored_head(model)
    inputs, labels = batch(seed=1)
    want, _, want_grads = model_pass(model, inputs, labels, scored=False, temperature=0.9)
    got, _, got_grads = model_pass(model, inputs, labels, scored=True, temperature=0.9)
    torch.testing.assert_close(got, want)
    assert want_grads.keys() == got_grads.keys() and all("lora" in n for n in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert base.lm_head is model.get_output_embeddings()

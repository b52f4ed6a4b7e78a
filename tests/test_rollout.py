import pytest
import torch
import transformers
from conftest import tiny_hybrid, tiny_model

from nested_reft import skip_layers
from nested_reft.nested import build_truncated_model
from nested_reft.rollout import (SamplingConfig, generate, left_pad, process_logits, sample_token, scaled_logits,
                                 sequence_logprobs)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
EOS, PAD = 3, 0


def greedy(n=8, **kw):
    return SamplingConfig(temperature=0, max_new_tokens=n, **kw)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen2-sliding"])
@pytest.mark.parametrize("skip", [(), (0,), (2, 4)])
def test_greedy_engine_matches_smaller_models_generate(family, skip):
    model = tiny_model(family)
    r = generate(model, PROMPTS, 2, greedy(10), None, PAD, skip=skip)
    small = build_truncated_model(model, skip) if skip else model
    ids, mask = left_pad(PROMPTS, PAD)
    ref = small.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None)[:, ids.size(1):]
    assert torch.equal(r.completion_ids[::2], ref) and torch.equal(r.completion_ids[1::2], ref)
    assert r.skip == tuple(skip)


def test_cached_decode_equals_no_cache_recompute():
    model = tiny_model("qwen2-sliding")
    r = generate(model, PROMPTS, 1, greedy(12), None, PAD, skip=(0, 3))
    with torch.no_grad(), skip_layers(model, (0, 3)):
        for row, prompt in enumerate(PROMPTS):
            seq = list(prompt)
            for _ in range(12):  # full forward over the whole sequence every step, no cache
                seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
            assert r.completion_ids[row].tolist() == seq[len(prompt):]


def test_sampled_logprobs_equal_teacher_forced_nested_pass(qwen):
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=16)
    r = generate(qwen, PROMPTS, 4, cfg, EOS, PAD, skip=(1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), skip_layers(qwen, (1, 3)):
        tf = sequence_logprobs(qwen, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.7)
    torch.testing.assert_close(tf * r.completion_mask, r.behavior_logprobs, rtol=0, atol=1e-4)
    re = generate(qwen, PROMPTS, 4, SamplingConfig(temperature=0.7, max_new_tokens=16, logprobs="recompute"),
                  EOS, PAD, skip=(1, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(re.completion_ids, r.completion_ids)
    torch.testing.assert_close(re.behavior_logprobs, r.behavior_logprobs, rtol=0, atol=1e-4)


def test_teacher_forced_logprobs_suppress_eos_like_the_sampler(qwen):
    """Fixed length (EOS suppressed before min_new_tokens): scoring with the same suppression gives the
    sampled log-probs; scoring the unsuppressed softmax gives less by log(1 - p(EOS))."""
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, min_new_tokens=12)
    r = generate(qwen, PROMPTS, 4, cfg, EOS, PAD, generator=torch.Generator().manual_seed(0))
    args = (qwen, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
    with torch.no_grad():
        same = sequence_logprobs(*args, eos_token_id=EOS, min_new_tokens=12)
        plain = sequence_logprobs(*args)
    torch.testing.assert_close(same, r.behavior_logprobs, rtol=0, atol=1e-4)
    assert bool((plain < same - 1e-7).all())
    re = generate(qwen, PROMPTS, 4, SamplingConfig(temperature=1.0, max_new_tokens=12, min_new_tokens=12,
                  logprobs="recompute"), EOS, PAD, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(re.behavior_logprobs, r.behavior_logprobs, rtol=0, atol=1e-4)


def test_left_padding_does_not_change_a_prompts_completion(qwen):
    batch = generate(qwen, PROMPTS, 1, greedy(), None, PAD, skip=(0,))
    for row, prompt in enumerate(PROMPTS):
        alone = generate(qwen, [prompt], 1, greedy(), None, PAD, skip=(0,))
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[row])
        torch.testing.assert_close(alone.behavior_logprobs[0], batch.behavior_logprobs[row], rtol=0, atol=1e-5)


def test_fixed_length_suppresses_eos_and_counts_tokens(qwen):
    qwen.lm_head.weight.data[EOS] += 5.0  # make EOS very likely
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, min_new_tokens=12)
    r = generate(qwen, PROMPTS, 3, cfg, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape == (9, 12) and bool(r.completion_mask.all())
    assert not bool((r.completion_ids == EOS).any())
    assert r.num_completion_tokens == 9 * 12 and r.num_prompt_tokens == 3 * (5 + 2 + 3)


def test_variable_length_stops_at_eos_and_masks_after(qwen):
    qwen.lm_head.weight.data[EOS] += 3.0
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=20, min_new_tokens=2)
    r = generate(qwen, PROMPTS, 8, cfg, EOS, PAD, generator=torch.Generator().manual_seed(0))
    lengths = r.completion_mask.sum(1)
    assert (lengths >= 2).all() and (lengths < 20).any()
    for row in range(r.completion_ids.size(0)):
        n = int(lengths[row])
        ids = r.completion_ids[row]
        assert n == ids.numel() or ids[n - 1] == EOS  # EOS is the last masked token
        assert (ids[n:] == PAD).all() and (r.behavior_logprobs[row, n:] == 0).all()
        assert not bool((ids[: n - 1] == EOS).any())
    assert r.num_completion_tokens == int(lengths.sum())


def test_seeded_runs_reproduce_and_seeds_differ(qwen):
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=10)
    a, b, c = (generate(qwen, PROMPTS, 2, cfg, EOS, PAD, skip=(2,), generator=torch.Generator().manual_seed(s))
               for s in (1, 1, 2))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.behavior_logprobs, b.behavior_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_top_p_and_top_k_truncate_and_renormalise():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = process_logits(logits, SamplingConfig(top_p=0.7)).exp()
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = process_logits(logits, SamplingConfig(top_p=0.8)).exp()  # 0.5+0.3 reaches 0.8 exactly: stop there
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = process_logits(logits, SamplingConfig(top_k=3)).exp()
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    p = process_logits(logits, SamplingConfig(temperature=0.5)).exp()
    torch.testing.assert_close(p, torch.softmax(logits * 2, -1))


def test_top_p_sampling_never_draws_outside_nucleus(qwen):
    cfg = SamplingConfig(temperature=1.0, top_p=0.3, max_new_tokens=6)
    r = generate(qwen, PROMPTS, 4, cfg, None, PAD, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tf = sequence_logprobs(qwen, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
    # the nucleus distribution renormalises: its log-prob is never below the full softmax's
    assert bool((r.behavior_logprobs >= tf - 1e-5).all())


def test_training_mode_restored_and_bad_config_named(qwen):
    qwen.train()
    generate(qwen, PROMPTS, 1, greedy(3), None, PAD)
    assert qwen.training
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(qwen, PROMPTS, 1, SamplingConfig(max_new_tokens=4, min_new_tokens=5), None, PAD)
    with pytest.raises(ValueError, match="top_p"):
        generate(qwen, PROMPTS, 1, SamplingConfig(top_p=0.0), None, PAD)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(qwen, [[5], []], 1, greedy(3), None, PAD)


def test_inverse_cdf_sampler_follows_the_distribution_and_skips_excluded_tokens():
    logp = process_logits(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), SamplingConfig(top_p=0.9))
    n = 40_000
    tokens = sample_token(logp.expand(n, 4), False, torch.rand(n, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=4).double() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.95,
                               rtol=0, atol=0.01)
    edges = sample_token(logp.expand(2, 4), False, torch.tensor([0.0, 1.0 - 2**-24]))
    assert edges.tolist() == [0, 2]  # the ends of [0, 1) land on the first and last token of mass > 0


def test_per_prompt_generators_make_a_prompts_samples_independent_of_its_batch(qwen):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = generate(qwen, PROMPTS, 3, cfg, EOS, PAD, skip=(1,), generator=gens(10, 11, 12))
    for i, prompt in enumerate(PROMPTS):
        alone = generate(qwen, [prompt], 3, cfg, EOS, PAD, skip=(1,), generator=gens(10 + i))
        rows, length = slice(3 * i, 3 * i + 3), alone.completion_ids.size(1)
        assert torch.equal(alone.completion_ids, batch.completion_ids[rows, :length])
        assert not batch.completion_mask[rows, length:].any()
        torch.testing.assert_close(alone.behavior_logprobs, batch.behavior_logprobs[rows, :length], rtol=0, atol=1e-5)
    assert len({tuple(r) for r in batch.completion_ids.tolist()}) > 3  # the G rows of a prompt differ
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        generate(qwen, PROMPTS, 1, cfg, EOS, PAD, generator=gens(1, 2))


def test_collective_stop_keeps_decoding_but_returns_the_same(qwen):
    """all_done (FSDP): while another process is still decoding, this one keeps running forwards after its
    own rows hit EOS, and still returns exactly what it returns alone."""
    eos = sorted({int(t) for t in generate(qwen, PROMPTS, 1, greedy(1), None, PAD).completion_ids[:, 0]})
    calls = []
    qwen.register_forward_hook(lambda *_: calls.append(1))
    alone = generate(qwen, PROMPTS, 1, greedy(8), eos, PAD)  # every row emits EOS first: done after 1 token
    forwards_alone, calls[:] = len(calls), []
    waiting = generate(qwen, PROMPTS, 1, greedy(8), eos, PAD, all_done=lambda local_done: False)
    assert alone.completion_ids.size(1) == 1 and forwards_alone == 1  # the prefill only
    assert len(calls) == 8  # prefill + 7 decode steps: as many as a process that never hits EOS
    for a, b in zip(alone, waiting):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else (a == b or isinstance(a, float))


# ---- recomputed behaviour log-probs (issue 13, item 2) ---------------------------------------------


def test_recompute_with_several_eos_ids(qwen):
    """Instruct generation configs list two EOS ids; recompute must take them (and ban both)."""
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10, min_new_tokens=6, logprobs="recompute")
    re = generate(qwen, PROMPTS, 2, cfg, [EOS, 4], PAD, generator=torch.Generator().manual_seed(0))
    sampled = generate(qwen, PROMPTS, 2, SamplingConfig(temperature=1.0, max_new_tokens=10, min_new_tokens=6),
                       [EOS, 4], PAD, generator=torch.Generator().manual_seed(0))
    assert torch.equal(re.completion_ids, sampled.completion_ids)
    torch.testing.assert_close(re.behavior_logprobs, sampled.behavior_logprobs, rtol=0, atol=1e-4)


def test_recompute_keeps_the_eos_ban_when_the_eos_id_is_0():
    model = tiny_model("qwen2", eos_token_id=0, pad_token_id=2)
    model.lm_head.weight.data[0] += 3.0  # EOS likely, so dropping the ban would show
    kw = dict(temperature=1.0, max_new_tokens=8, min_new_tokens=8)
    sampled = generate(model, PROMPTS, 2, SamplingConfig(**kw), 0, 2, generator=torch.Generator().manual_seed(0))
    re = generate(model, PROMPTS, 2, SamplingConfig(**kw, logprobs="recompute"), 0, 2,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(re.behavior_logprobs, sampled.behavior_logprobs, rtol=0, atol=1e-4)


def test_recomputed_logprobs_hold_no_autograd_graph(qwen):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=6, logprobs="recompute")
    with torch.enable_grad():
        r = generate(qwen, PROMPTS, 2, cfg, EOS, PAD, skip=(1,), generator=torch.Generator().manual_seed(0))
    assert not r.behavior_logprobs.requires_grad and r.behavior_logprobs.grad_fn is None


def test_plain_sampling_matches_the_general_path():
    """sample()'s plain path (softmax + cumsum) and the general one (log-softmax, exp, cumsum) draw the
    same tokens from the same uniforms and agree on the log-probs to float32 rounding."""
    from nested_reft.rollout import sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 1000, generator=gen) * 4
    u = torch.rand(256, generator=gen)
    for temperature in (1.0, 0.7):
        cfg = SamplingConfig(temperature=temperature)
        tok, logp = sample(logits, cfg, u)
        ref = process_logits(logits, cfg)
        assert torch.equal(tok, sample_token(ref, False, u))
        torch.testing.assert_close(logp, ref.gather(-1, tok[:, None]).squeeze(-1), rtol=0, atol=2e-6)


def weight_casts(model, run):
    """How many times `run()` casts each of the model's weights (by storage) to another dtype."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in model.parameters()}
    counts = Counter()

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args[0].data_ptr() in weights:
                counts[args[0].data_ptr()] += 1
            return func(*args, **(kwargs or {}))

    with Casts():
        result = run()
    return counts, result


def test_under_autocast_each_weight_is_cast_once_per_call_and_the_copies_are_dropped(qwen, monkeypatch):
    """bf16 autocast over float32 weights (the trainer's mixed precision): the decode loop casts each weight
    once, not at every token, and samples what the inference_mode loop samples; the copies are dropped when
    generate returns (a second call in the same autocast casts again), and a forward that needs gradients in
    the same autocast gets them."""
    from nested_reft import rollout

    cfg = SamplingConfig(max_new_tokens=6, min_new_tokens=6)

    def run():
        return generate(qwen, [[5, 6, 7], [8, 9]], 2, cfg, None, 0, generator=torch.Generator().manual_seed(0))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts, got = weight_casts(qwen, run)
        assert counts and max(counts.values()) == 1  # prefill + 5 one-token steps, one cast per weight
        again, _ = weight_casts(qwen, run)
        assert again == counts  # the first call's copies were dropped, not kept for the caller
        qwen(input_ids=torch.tensor([[5, 6, 7]])).logits.float().sum().backward()
    assert all(p.grad is not None for p in qwen.parameters())
    monkeypatch.setattr(rollout, "_decode_mode", lambda model, device: torch.inference_mode())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts, ref = weight_casts(qwen, run)
    assert max(counts.values()) == 6  # torch >= 2.10 keeps no copies under inference_mode: a cast per forward
    assert torch.equal(got.completion_ids, ref.completion_ids)
    assert torch.equal(got.behavior_logprobs, ref.behavior_logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scaled_logits_equal_the_plain_division_and_leave_the_input_alone(dtype, temperature):
    logits = torch.randn(3, 11).to(dtype)
    before = logits.clone()
    got = scaled_logits(logits, temperature)
    assert got.dtype == torch.float32 and torch.equal(got, logits.float() / temperature)
    assert torch.equal(logits, before)



def _prefill_rows(model):
    """Record the batch size of every forward of `model`; returns (list, hook handle)."""
    rows = []
    return rows, model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape),
                                                 with_kwargs=True)


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral", "qwen2-sliding", "gemma3_text", "gpt2", "opt"])
@pytest.mark.parametrize("skip", [(), (1,)])
def test_a_prompt_is_prefilled_once_for_its_completions(family, skip, monkeypatch):
    from test_decode_attention import MODELS

    from nested_reft import rollout

    model = MODELS[family]()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [10, 11]]  # left padding; a prompt given twice
    cfg = SamplingConfig(max_new_tokens=6, min_new_tokens=2)
    rows, hook = _prefill_rows(model)
    shared = generate(model, prompts, 4, cfg, 3, 0, skip=skip, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert rows[0] == (3, 5) and rows[1] == (16, 1)  # the prefill ran the 3 distinct prompts; the steps all rows
    monkeypatch.setattr(rollout.EagerDecoder, "distinct_rows", lambda self, ids, mask: (torch.arange(16),) * 2)
    full = generate(model, prompts, 4, cfg, 3, 0, skip=skip, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared.completion_ids, full.completion_ids)
    torch.testing.assert_close(shared.behavior_logprobs, full.behavior_logprobs, rtol=0, atol=1e-6)


def test_distinct_rows_are_told_apart_by_their_mask_too():
    from nested_reft.rollout import EagerDecoder

    decoder = EagerDecoder(tiny_model("qwen2"), 8)
    ids = torch.tensor([[0, 2], [3, 4], [0, 2], [3, 4], [0, 2]])
    mask = torch.tensor([[0, 1], [1, 1], [1, 1], [1, 1], [0, 1]])  # row 2's 0 is a real token, not padding
    first, inverse = decoder.distinct_rows(ids, mask)
    assert torch.equal(ids[first][inverse], ids) and torch.equal(mask[first][inverse], mask)
    assert sorted(first.tolist()) == [0, 1, 2]
    first, inverse = decoder.distinct_rows(ids[:2], mask[:2])
    assert first.tolist() == inverse.tolist() == [0, 1]  # nothing repeats: every row in order



@pytest.mark.parametrize("name, skip", [("bamba", ()), ("jamba", ()), ("qwen3_next", ()), ("qwen3_next", (1,)),
                                        ("granitemoehybrid", (2,))])  # Bamba and Jamba cannot be nested
def test_models_with_recurrent_layers_share_the_prefill_and_drop_finished_rows(name, skip):
    """Mamba / gated-delta-rule layers select the rows of their conv and recurrent states: each prompt is
    prefilled once, finished rows leave the batch, and every row decodes what HF generate() decodes for its
    prompt alone (left padding included), on the full model and a nested one."""
    from nested_reft.kv_cache import decode_cache, selects_rows
    from nested_reft.nested import skip_layers

    model = tiny_hybrid(name)
    assert selects_rows(decode_cache(model, 8))
    prompts, eos = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], list(range(3, 40))  # many EOS ids: uneven lengths
    rows, hook = _prefill_rows(model)
    got = generate(model, prompts, 2, SamplingConfig(max_new_tokens=8, min_new_tokens=0, temperature=0), eos, 0,
                   skip=skip)
    hook.remove()
    lengths = got.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # rows finished at different steps
    assert rows[0][0] == 3 and min(r[0] for r in rows) < 6  # one prefill row per prompt; finished rows dropped
    for i, prompt in enumerate(prompts):
        with skip_layers(model, skip):
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)[0, len(prompt):]
        for row in (2 * i, 2 * i + 1):
            assert got.completion_ids[row, : lengths[row]].tolist() == ref[: lengths[row]].tolist()


def test_selecting_rows_of_a_recurrent_cache_selects_its_states():
    from nested_reft.kv_cache import decode_cache, select_cache_rows

    model = tiny_hybrid("bamba")
    cache = decode_cache(model, 8)
    with torch.no_grad():
        model(input_ids=torch.randint(5, 40, (3, 4)), use_cache=True, cache=cache)
    before = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) if hasattr(layer, "conv_states")
              else (layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    select_cache_rows(cache, torch.tensor([2, 0, 2]))
    for (a, b), layer in zip(before, cache.layers):
        now = ((layer.conv_states[0], layer.recurrent_states[0]) if hasattr(layer, "conv_states")
               else (layer.keys, layer.values))
        assert torch.equal(now[0], a[[2, 0, 2]]) and torch.equal(now[1], b[[2, 0, 2]])


def test_layers_that_read_another_layers_kv_still_share_the_prefill_and_drop_rows():
    """Gemma 4's KV-sharing layers hold a stateless DummyLayer in the cache: rows can still be copied and dropped."""
    from nested_reft import rollout
    from nested_reft.kv_cache import decode_cache, selects_rows

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma4TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_kv_shared_layers=2, sliding_window=4, pad_token_id=0,
        eos_token_id=3, bos_token_id=1,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])).eval()
    assert "DummyLayer" in {type(layer).__name__ for layer in decode_cache(model, 8).layers}
    assert selects_rows(decode_cache(model, 8))
    prompts, cfg = [[5, 6, 7], [8, 9]], SamplingConfig(max_new_tokens=8, min_new_tokens=0)
    rows, hook = _prefill_rows(model)
    shared = generate(model, prompts, 4, cfg, list(range(3, 30)), 0, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert rows[0][0] == 2 and min(r[0] for r in rows) < 8  # one prefill row per prompt; finished rows dropped
    original = rollout.EagerDecoder.__init__

    def keep_every_row(self, model, capacity):
        original(self, model, capacity)
        self.drops_rows = False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout.EagerDecoder, "__init__", keep_every_row)
        full = generate(model, prompts, 4, cfg, list(range(3, 30)), 0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared.completion_ids, full.completion_ids)
    torch.testing.assert_close(shared.behavior_logprobs, full.behavior_logprobs, rtol=0, atol=1e-5)

import contextlib
from unittest import mock

import pytest
import torch
from conftest import tiny_model
from test_decode_attention import MODELS

from nested_reft import decode_graphs as dg
from nested_reft import rollout
from nested_reft.nested import skip_layers
from nested_reft.rollout import SamplingConfig, generate

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]  # left padding
EOS = list(range(3, 20))  # frequent EOS: rows finish early and leave the batch, so graphs are re-captured


class Captures:
    """CPU stand-in for capture_cuda_graph, with a graph's semantics: at capture the step's Python runs once
    while make_fx records the aten ops it calls (transformers told a stream is capturing, so it takes the
    branches it takes in a real capture); every replay re-runs those recorded ops on the same tensors
    (weights, cache buffers, input buffers), so whatever the Python decided at capture time (a shape, a
    branch, a value) stays as it was, as in a CUDA graph. Recording executes the step, so the cache is put
    back afterwards (a capture runs nothing). It checks the decoder's bookkeeping: inputs copied into the
    captured buffers, the cache's counter advanced once per token, a new capture after each compaction."""

    def __init__(self, restore=True, record=True):
        self.captures = self.replays = 0
        self.restore = restore  # False: the recording's own run stays in the cache (a warm-up spending a slot)
        self.record = record  # False: replays re-run the step's Python (cheaper; for tests of the wiring only)

    def bind(self, decoder):
        return lambda forward: self.capture(decoder, forward)

    def capture(self, decoder, forward):
        from torch.fx.experimental.proxy_tensor import make_fx

        self.captures += 1
        first = forward()  # the warm-up: this step's output
        out = torch.empty_like(first)
        if not self.record:
            return first, lambda: self.count(out.copy_(forward())), out
        state = [t for layer in decoder.cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]
        saved = [t.clone() for t in state]
        with mock.patch("transformers.utils.import_utils.is_cuda_stream_capturing", lambda: True):
            recorded = make_fx(lambda: forward())()  # transformers' capture-time branches, as on CUDA
        for t, before in zip(state, saved if self.restore else state):
            t.copy_(before)
        return first, lambda: self.count(out.copy_(recorded())), out

    def count(self, _):
        self.replays += 1


def graphed(monkeypatch, captures):
    """Let generate(cuda_graphs=True) run on CPU, capturing through `captures`, its one-token steps attending
    through SDPA as on CUDA (on CPU the loop otherwise takes decode_attention's products)."""
    def decoder(model, capacity, kwarg):
        made = dg.GraphDecoder(model, capacity, kwarg, capture=lambda forward: None)
        made.capture = captures.bind(made)
        return made

    monkeypatch.setattr(rollout, "graphs_problem", lambda model, device: None)
    monkeypatch.setattr(rollout, "GraphDecoder", decoder)
    monkeypatch.setattr(rollout, "single_query_attention", lambda model: contextlib.nullcontext())


def run(model, graphs, eos=EOS, skip=(1,), **sampling):
    cfg = SamplingConfig(**{"max_new_tokens": 12, **sampling})
    return generate(model, PROMPTS, 3, cfg, eos, 0, skip=skip, generator=torch.Generator().manual_seed(0),
                    cuda_graphs=graphs)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "phi3", "olmo2", "gpt_neox", "gpt2", "opt"])
def test_graphed_steps_sample_what_the_eager_loop_samples(family, monkeypatch):
    model = MODELS[family]()
    ref = run(model, False)
    captures = Captures()
    graphed(monkeypatch, captures)
    got = run(model, True)
    assert torch.equal(got.completion_ids, ref.completion_ids)
    assert torch.equal(got.completion_mask, ref.completion_mask)
    torch.testing.assert_close(got.behavior_logprobs, ref.behavior_logprobs, rtol=0, atol=1e-5)
    steps = got.completion_ids.size(1) - 1  # one-token forwards after the prefill
    assert captures.captures >= 2  # rows left the batch: a graph per batch composition
    assert captures.replays == steps - captures.captures > 0


@pytest.mark.parametrize("prompts", [[[5, 6, 7], [8, 9, 10]], [[5, 6, 7, 8]]])
def test_batches_without_padding(prompts, monkeypatch):
    """With no row padded the mask is all ones: the causal mask alone must hide the cache slots not yet
    written (a one-prompt batch, or prompts of one length)."""
    model = tiny_model("qwen2")
    cfg = SamplingConfig(max_new_tokens=8)

    def sampled(graphs):
        return generate(model, prompts, 2, cfg, None, 0, generator=torch.Generator().manual_seed(0), cuda_graphs=graphs)

    ref = sampled(False)
    graphed(monkeypatch, Captures())
    got = sampled(True)
    assert torch.equal(got.completion_ids, ref.completion_ids)
    torch.testing.assert_close(got.behavior_logprobs, ref.behavior_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("skip", [(), (1,), (1, 2)])
def test_full_and_nested_models_fixed_length(skip, monkeypatch):
    model = tiny_model("qwen2")
    ref = run(model, False, eos=None, skip=skip, max_new_tokens=10)
    captures = Captures()
    graphed(monkeypatch, captures)
    got = run(model, True, eos=None, skip=skip, max_new_tokens=10)
    assert got.skip == tuple(skip)
    assert torch.equal(got.completion_ids, ref.completion_ids)
    torch.testing.assert_close(got.behavior_logprobs, ref.behavior_logprobs, rtol=0, atol=1e-5)
    assert (captures.captures, captures.replays) == (1, 8)  # no row finishes: one graph, replayed 8 times


def test_greedy_and_top_p(monkeypatch):
    model = tiny_model("llama")
    refs = [run(model, False, eos=None, temperature=0.0), run(model, False, eos=None, top_p=0.8, top_k=20)]
    graphed(monkeypatch, Captures())
    gots = [run(model, True, eos=None, temperature=0.0), run(model, True, eos=None, top_p=0.8, top_k=20)]
    for got, ref in zip(gots, refs):
        assert torch.equal(got.completion_ids, ref.completion_ids)


def test_stale_input_buffers_would_change_the_tokens(monkeypatch):
    """The check above can fail: a decoder that stops copying the new tokens into the captured buffers
    samples other tokens."""
    model = tiny_model("qwen2")
    ref = run(model, False, eos=None)
    graphed(monkeypatch, Captures())
    monkeypatch.setattr(dg.GraphDecoder, "step", lambda self, tok, pos, mask, filled: _step_without_copies(
        self, tok, pos, mask))
    got = run(model, True, eos=None)
    assert not torch.equal(got.completion_ids, ref.completion_ids)


def test_a_step_that_advances_the_cache_twice_is_caught(monkeypatch):
    """The stand-in's replays keep the cache's counter: a capture that left its own run in the cache (one
    extra slot spent per capture, as an extra warm-up call would) samples other tokens."""
    model = tiny_model("qwen2")
    ref = run(model, False, eos=None)
    graphed(monkeypatch, Captures(restore=False))
    got = run(model, True, eos=None)
    assert not torch.equal(got.completion_ids, ref.completion_ids)


def test_the_previous_graph_lives_until_the_next_capture():
    """On CUDA a pool whose graphs are all gone cannot take a new capture while its memory is in use (the
    logits last read are in it): `select` keeps the old graph until the next step has captured."""
    model = tiny_model("qwen2")
    decoder = dg.GraphDecoder(model, 8, rollout.cache_kwarg(model), capture=lambda forward: (forward(), "graph", "out"))
    ids = torch.tensor([[5, 6], [7, 8]])
    mask = torch.ones_like(ids)
    full_mask, positions = torch.cat([mask, mask], 1), mask.cumsum(-1) - 1
    with torch.inference_mode():
        decoder.prefill(ids, full_mask, positions)
        decoder.step(torch.tensor([1, 2]), positions[:, -1:] + 1, full_mask, 3)
        decoder.select(torch.tensor([1]))
        assert decoder.retired == ("graph", "out") and decoder.replay is None
        decoder.step(torch.tensor([3]), positions[1:, -1:] + 2, full_mask[1:], 4)
        assert decoder.retired is None and decoder.replay == "graph"


def _step_without_copies(self, tok, positions, full_mask):
    if self.replay is None:
        self.inputs = (tok[:, None].clone(), positions.clone(), full_mask)
        first, self.replay, self.out = self.capture(self._forward)
        return first[:, -1]
    self.replay()
    return self.out[:, -1]


@pytest.mark.parametrize("family, attention, skip", [
    *[(f, "sdpa", ()) for f in ("qwen2", "llama", "qwen3", "phi3", "olmo2", "gpt_neox", "gpt2", "opt")],
    ("qwen2", "eager", ()), ("llama", "sdpa", (1, 2))])
def test_a_graphed_step_never_reads_a_tensor_on_the_host(family, attention, skip):
    """What a CUDA graph cannot hold: a step that reads a tensor's value in Python (`.item()`, `bool()`, a
    data-dependent shape). Run with fake tensors, such a read raises; transformers takes its capture-safe
    branches there, as it does while a CUDA stream is capturing."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    model = MODELS[family]()
    model.set_attn_implementation(attention)
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = (ids != 0).long()
    full_mask, positions = torch.cat([mask, mask.new_ones(2, 4)], 1), (mask.cumsum(-1) - 1).clamp(min=0)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.inference_mode(), skip_layers(model, skip):
        decoder = dg.GraphDecoder(model, 7, rollout.cache_kwarg(model), capture=lambda forward: (forward(), None, None))
        decoder.prefill(ids, full_mask, positions)
        with fake:
            for layer in decoder.cache.layers:
                layer.keys, layer.values, layer.cumulative_length = map(
                    fake.from_tensor, (layer.keys, layer.values, layer.cumulative_length))
            logits = decoder.step(fake.from_tensor(torch.tensor([1, 2])), fake.from_tensor(positions[:, -1:] + 1),
                                  fake.from_tensor(full_mask), 4)
            assert logits.shape == (2, 97)
            with pytest.raises(DataDependentOutputException):  # the check can fail
                bool(logits.sum() > 0)


def test_refusals_name_the_problem():
    qwen = tiny_model("qwen2")
    assert "CUDA device" in dg.graphs_problem(qwen, torch.device("cpu"))
    assert dg.graphs_problem(qwen, torch.device("cuda")) is None
    for family in ("mistral", "qwen2-sliding", "gemma3_text"):
        assert "sliding-window" in dg.graphs_problem(MODELS[family](), torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(qwen, [[5, 6]], 2, SamplingConfig(max_new_tokens=3), None, 0, cuda_graphs=True)


def test_attention_and_rotary_scaling_that_read_the_host_are_refused(monkeypatch):
    dynamic = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic rotary scaling" in dg.graphs_problem(dynamic, torch.device("cuda"))
    qwen = tiny_model("qwen2")
    monkeypatch.setattr(qwen.config, "_attn_implementation", "flash_attention_2")
    assert "needs SDPA or eager attention, not 'flash_attention_2'" in dg.graphs_problem(qwen, torch.device("cuda"))


def test_a_transformers_whose_static_cache_counts_in_python_is_refused(monkeypatch):
    """A replay cannot move a Python int: graphs need the write position in a tensor (older StaticLayers)."""
    from types import SimpleNamespace

    layer = dg.StaticLayer(max_cache_len=1)
    layer.cumulative_length = 0
    monkeypatch.setattr(dg, "StaticCache", lambda config, max_cache_len: SimpleNamespace(layers=[layer]))
    assert "keeps its write position in a tensor" in dg.graphs_problem(tiny_model("qwen2"), torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graphs_on_a_gpu(bf16, monkeypatch):
    model = tiny_model("qwen2").cuda()
    captures = []
    real = dg.capture_cuda_graph
    monkeypatch.setattr(dg, "capture_cuda_graph", lambda *a: captures.append(1) or real(*a))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        ref, first = run(model, False), run(model, True)  # the first also makes the capture stream's workspace
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        got = run(model, True)
        torch.cuda.synchronize()
        kept = sum(t.numel() * t.element_size() for t in got if isinstance(t, torch.Tensor))
        assert torch.cuda.memory_allocated() - before <= kept + 16 * 512  # graphs, cache, cast copies all freed
        assert len(captures) >= 4  # rows left the batch: a composition's graph retired while the next captured
        assert torch.equal(got.completion_ids, first.completion_ids)
        with skip_layers(model, (1,)), torch.no_grad():
            forced = rollout.sequence_logprobs(model, got.prompt_ids, got.prompt_mask, got.completion_ids,
                                               got.completion_mask)
    if not bf16:
        assert torch.equal(got.completion_ids, ref.completion_ids)
        torch.testing.assert_close(got.behavior_logprobs, ref.behavior_logprobs, rtol=0, atol=1e-4)
    # the graphs' log-probs are those of the tokens they sampled, to the dtype's rounding (in bf16 a sampled
    # token can differ from the eager loop's where rounding moves a boundary: compare with a forced pass)
    diff = ((forced - got.behavior_logprobs).abs() * got.completion_mask).max().item()
    assert diff < (1e-4 if not bf16 else 0.1), diff

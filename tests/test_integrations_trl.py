"""nested_reft.integrations.trl: NestedGRPOTrainer against TRL's GRPOTrainer and `nested-reft train`'s functions.

Tiny 28-layer Qwen2 (width 32) with a word-level tokenizer, CPU, fp32. Skipped when TRL is not installed
(`pip install -e ".[trl]"`).
"""

import importlib
import random
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import nested_reft.integrations.trl as ntrl  # noqa: E402
from nested_reft.config import TrainConfig  # noqa: E402
from nested_reft.integrations.trl import NestedGRPOConfig, NestedGRPOTrainer  # noqa: E402
from nested_reft.layer_skip import skip_set_at  # noqa: E402
from nested_reft.objectives import importance_weights, policy_loss  # noqa: E402
from nested_reft.rollout import sequence_logprobs  # noqa: E402
from nested_reft.trainer import step_skip_set  # noqa: E402

G = 4  # completions per prompt
N_LAYERS = 28


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, tokenizer, dataset): 28-layer width-32 Qwen2, word-level tokenizer, 16 prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + [str(i) for i in range(10)] + list("+-*=?.,") + \
        "what is the answer plus minus times".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2))
    path = tmp_path_factory.mktemp("trl-tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    rng = random.Random(0)
    ds = Dataset.from_dict({"prompt": [f"what is {rng.randint(1, 9)} + {rng.randint(1, 9)} ?" for _ in range(16)]})
    return str(path), tokenizer, ds


def reward(completions, **kwargs):
    """Varied, deterministic rewards so that the advantages (and the gradient) are not zero."""
    return [float(len(c) % 3) for c in completions]


def settings(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=8,
                num_generations=G, max_completion_length=8, max_steps=2, logging_steps=1, save_strategy="no",
                learning_rate=1e-3, seed=3, gradient_checkpointing=False)
    base.update(kw)
    return base


def make(cls, cfg_cls, tiny, tmp_path, **kw):
    path, tokenizer, ds = tiny
    trainer = cls(model=path, reward_funcs=reward, args=cfg_cls(**settings(tmp_path, **kw)), train_dataset=ds,
                  processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; needed to call compute_loss alone
    return trainer


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_close_grads(a, b, rtol):
    assert a.keys() == b.keys() and a
    scale = max(v.abs().max().item() for v in a.values())
    assert scale > 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= rtol * scale, f"max grad difference {worst} vs scale {scale}"


def batch_rows(ds, prompts=2):
    return [ds[i] for i in range(prompts) for _ in range(G)]  # RepeatSampler's layout: G contiguous copies


# ---- (a) skip_ratio = 0: TRL's loss and gradient ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,mitigation", [("dapo", "practical"), ("grpo", "practical"), ("dapo", "base")])
def test_skip0_same_loss_and_gradient_as_trl(tiny, tmp_path, loss_type, mitigation):
    nested = make(NestedGRPOTrainer, NestedGRPOConfig, tiny, tmp_path, loss_type=loss_type, skip_ratio=0.0,
                  mitigation=mitigation)
    stock = make(GRPOTrainer, GRPOConfig, tiny, tmp_path, loss_type=loss_type)
    inputs = nested._generate_and_score_completions(batch_rows(tiny[2]))
    assert nested.skip_history == {0: ()}
    assert inputs["completion_mask"].sum() > 0 and inputs["advantages"].abs().sum() > 0
    plain = {k: v for k, v in inputs.items() if k != "sampling_per_token_logps"}
    ln, gn = loss_and_grads(nested, inputs)
    ls, gs = loss_and_grads(stock, plain)  # the loss itself is ~0 (sum of A over a group); the gradient is not
    if mitigation == "practical":  # h = 1: TRL's numbers
        torch.testing.assert_close(ln, ls, rtol=1e-6, atol=1e-9)
        assert_close_grads(gn, gs, 1e-6)
    else:  # h = rho = 1 up to the engine's log-prob rounding
        torch.testing.assert_close(ln, ls, rtol=1e-5, atol=1e-7)
        assert_close_grads(gn, gs, 1e-5)
    assert inputs["advantages"].dim() == 1  # the buffered batch keeps TRL's advantages


# ---- h is nested-reft train's: importance_weights + policy_loss on the same batch --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mitigation", ["retrace", "tis"])
def test_nested_loss_is_nested_reft_trains_loss(tiny, tmp_path, mitigation):
    nested = make(NestedGRPOTrainer, NestedGRPOConfig, tiny, tmp_path, loss_type="bnpo", skip_ratio=0.15,
                  mitigation=mitigation, is_cap=1.05)
    inputs = nested._generate_and_score_completions(batch_rows(tiny[2]))
    assert nested.skip_history == {0: skip_set_at(N_LAYERS, 0.15, 1, 3, 0)}
    loss, grads = loss_and_grads(nested, inputs)

    model = nested.model
    model.zero_grad()
    mask = inputs["completion_mask"]
    logp = sequence_logprobs(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask)
    h, hm = importance_weights(logp.detach(), inputs["sampling_per_token_logps"], mask, mitigation, cap=1.05)
    assert hm["h_min"] < 1.0  # the nested model did sample off-policy tokens
    ref, _ = policy_loss(logp, None, inputs["advantages"], h, mask, "bnpo")
    ref.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)
    assert_close_grads(grads, ref_grads, 1e-5)


# ---- (b) two training steps at x = 0.15 ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_steps_use_train_skip_sets_and_log_h(tiny, tmp_path, monkeypatch):
    seen = []
    real_generate = ntrl.generate

    def spy(model, prompts, num_generations, cfg, eos, pad, skip=(), **kw):
        seen.append(tuple(skip))
        return real_generate(model, prompts, num_generations, cfg, eos, pad, skip=skip, **kw)

    monkeypatch.setattr(ntrl, "generate", spy)
    trainer = make(NestedGRPOTrainer, NestedGRPOConfig, tiny, tmp_path, skip_ratio=0.15)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    train_cfg = TrainConfig(model="m", skip_ratio=0.15, seed=3)  # border defaults to 1 at x > 0
    expected = [step_skip_set(train_cfg, N_LAYERS, s) for s in (0, 1)]
    assert expected == [skip_set_at(N_LAYERS, 0.15, 1, 3, s) for s in (0, 1)]
    assert all(len(s) == 4 for s in expected) and expected[0] != expected[1]  # U(28, 0.15) = 4
    assert seen == expected
    assert trainer.skip_history == {0: expected[0], 1: expected[1]}
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for step, log in enumerate(logs):
        assert log["nested/num_skipped"] == 4
        assert log["nested/skip_first"] == expected[step][0] and log["nested/skip_last"] == expected[step][-1]
        assert 0 < log["nested/h_min"] <= log["nested/h_mean"] <= log["nested/h_max"] <= 1.0  # retrace, lam = 1
        for key in ("nested/h_truncated_frac", "nested/h_capped_frac", "nested/h_masked_frac", "nested/log_ratio_mean",
                    "sampling/importance_sampling_ratio/mean", "rollout_corr/kl", "rollout_corr/ess_token",
                    "nested/rollout_s"):
            assert key in log, key
        assert log["nested/h_mean"] == log["sampling/importance_sampling_ratio/mean"]


@pytest.mark.slow
def test_fixed_policy_skips_the_given_layers(tiny, tmp_path):
    # two micro-batches per optimizer step: one generation, one skip set, metrics over both micro-batches
    trainer = make(NestedGRPOTrainer, NestedGRPOConfig, tiny, tmp_path, skip_ratio=0.1, skip_policy="fixed",
                   skip_layers=[20, 5, 9], max_steps=1, mitigation="mis", per_device_train_batch_size=4,
                   gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.skip_history == {0: (5, 9, 20)}
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["nested/num_skipped"] == 3 and log["nested/skip_first"] == 5 and log["nested/skip_last"] == 20
    assert 0 <= log["nested/h_masked_frac"] <= 1 and "rollout_corr/k3_kl" in log


# ---- (c) bad input: a clear error before any work -----------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """GRPOTrainer.__init__ (model loading, vLLM start-up) must not be reached."""
    def fail(*args, **kwargs):
        raise AssertionError("GRPOTrainer.__init__ was reached: the error came too late")

    monkeypatch.setattr(GRPOTrainer, "__init__", fail)


@pytest.mark.parametrize("kw,words", [
    (dict(use_vllm=True, skip_ratio=0.15), ["use_vllm=True", "skip_ratio=0.15", "not supported"]),
    (dict(mitigation="bogus"), ["mitigation='bogus'"]),
    (dict(skip_ratio=1.5), ["skip_ratio=1.5"]),
    (dict(skip_ratio=-0.1), ["skip_ratio=-0.1"]),
    (dict(lam=0.0), ["lam=0.0"]),
    (dict(is_level="batch"), ["is_level='batch'"]),
    (dict(is_cap=2.0, is_cap_low=3.0), ["is_cap_low=3.0"]),
    (dict(skip_policy="importance", skip_ratio=0.15), ["importance", "nested-reft train"]),
    (dict(skip_policy="fixed", skip_ratio=0.15), ["skip_layers"]),
    (dict(skip_ratio=0.15, steps_per_generation=2), ["steps_per_generation=2"]),
    (dict(skip_ratio=0.15, num_iterations=2), ["num_iterations=2"]),
    (dict(skip_ratio=0.15, loss_type="vespo"), ["vespo"]),
    (dict(min_p=0.1), ["min_p=0.1"]),
    (dict(repetition_penalty=1.2), ["repetition_penalty=1.2"]),
    (dict(generation_kwargs={"no_repeat_ngram_size": 2}), ["no_repeat_ngram_size"]),
])
def test_bad_config_is_named(tmp_path, kw, words):
    with pytest.raises(ValueError) as err:
        NestedGRPOConfig(**settings(tmp_path, **kw))
    for word in words:
        assert word in str(err.value)


def test_vllm_at_skip0_is_trls(tmp_path):
    args = NestedGRPOConfig(**settings(tmp_path, use_vllm=True, min_p=0.1))  # TRL's own path: nothing to refuse
    assert not args.uses_nested_engine


def test_errors_before_model_loading(tiny, tmp_path, no_work):
    path, tokenizer, ds = tiny
    args = NestedGRPOConfig(**settings(tmp_path, skip_ratio=0.15))
    args.use_vllm = True  # changed after the config was checked
    with pytest.raises(ValueError, match="use_vllm=True"):
        NestedGRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer)
    args = NestedGRPOConfig(**settings(tmp_path, skip_ratio=0.15, border=13))  # V = {13, 14}, U = 4
    with pytest.raises(ValueError, match="border=13"):
        NestedGRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer)
    args = NestedGRPOConfig(**settings(tmp_path, skip_ratio=0.15, skip_policy="fixed", skip_layers=[3, 4, 5]))
    with pytest.raises(ValueError, match="skip_layers"):  # U = 4 layers, 3 given
        NestedGRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer)
    args = NestedGRPOConfig(**settings(tmp_path, skip_ratio=0.15))
    with pytest.raises(ValueError, match="tools"):
        NestedGRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer,
                          tools=[len])
    with pytest.raises(TypeError, match="NestedGRPOConfig"):
        NestedGRPOTrainer(model=path, reward_funcs=reward, args=GRPOConfig(**settings(tmp_path)), train_dataset=ds,
                          processing_class=tokenizer)
    assert not (tmp_path / "out").exists()


def test_unsupported_trl_version(tmp_path, monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError) as err:
        NestedGRPOConfig(**settings(tmp_path, skip_ratio=0.15))
    assert ">=1.16,<1.17" in str(err.value) and "1.17.0" in str(err.value) and 'pip install -e ".[trl]"' in str(err.value)
    monkeypatch.delitem(sys.modules, "nested_reft.integrations.trl")
    with pytest.raises(ImportError, match=r"1\.17\.0"):
        importlib.import_module("nested_reft.integrations.trl")
    ntrl.check_trl_version("1.16.3")  # any 1.16 release passes
    with pytest.raises(RuntimeError):
        ntrl.check_trl_version("1.17.0.dev0")


def test_trl_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    monkeypatch.delitem(sys.modules, "nested_reft.integrations.trl")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[trl\]"'):
        importlib.import_module("nested_reft.integrations.trl")


def test_a_model_that_cannot_be_nested_is_refused_before_loading(tiny, tmp_path, no_work):
    from conftest import tiny_hybrid

    path, tokenizer, ds = tiny
    tiny_hybrid("jamba", num_hidden_layers=8, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "jamba")
    args = NestedGRPOConfig(**settings(tmp_path, skip_ratio=0.25))
    with pytest.raises(ValueError, match="NestedGRPOTrainer: JambaForCausalLM cannot be nested"):
        NestedGRPOTrainer(model=str(tmp_path / "jamba"), reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tokenizer)

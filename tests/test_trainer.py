import json
import math
import warnings

import pytest
import torch

from nested_reft import metrics, trainer
from nested_reft.checkpoint import latest_checkpoint
from nested_reft.config import ConfigError, TrainConfig


def small_cfg(toy_dir, out, **kw):
    base = dict(model=str(toy_dir / "model"), dataset="toy", data_dir=str(toy_dir / "data"), output_dir=str(out),
                steps=2, batch_size=4, micro_batch_size=2, rollout_batch_size=4, num_generations=4,
                max_new_tokens=8, min_new_tokens=8, lr=1e-3, save_steps=1, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def alternating_rewards(monkeypatch):
    """Rewards 1,0,1,0,... so every group has non-zero advantages (an untrained model scores 0)."""
    monkeypatch.setattr(trainer, "math_reward", lambda texts, answers, alts: [float(i % 2 == 0) for i in range(len(texts))])


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_one_rl_step_changes_the_parameters(toy_dir, tmp_path, alternating_rewards):
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", skip_ratio=0.15, mitigation="retrace"))
    before = params(run.model)
    m = trainer.rl_step(run, 0)
    after = params(run.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert m["num_skipped"] == 4 and all(1 <= i <= 26 for i in m["skip_set"])
    assert m["tokens_generated"] == 4 * 4 * 8 and m["h_max"] <= 1.0 + 1e-6 and not m["skipped_update"]


def reference_logprobs(model, rollout, eos: int, min_new_tokens: int) -> torch.Tensor:
    """log pi(y_l | s_l) [N, L] written out by hand: one full forward, EOS at -inf before min_new_tokens."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    length, p = rollout.completion_ids.size(1), rollout.prompt_ids.size(1)
    logits = logits[:, p - 1:p - 1 + length].float()  # [N, L, V]: the logits that predicted each completion token
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[:, :min_new_tokens, eos] = True
    logp = logits.masked_fill(banned, float("-inf")).log_softmax(-1)
    return logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("min_new_tokens", [0, 8])
def test_no_skip_gives_unit_weights_and_plain_grpo_gradient(toy_dir, tmp_path, alternating_rewards, min_new_tokens):
    """x = 0, b = 0, m = base: h = 1 to rounding and the accumulated gradient equals plain GRPO's,
    computed here independently on the whole batch in one pass. With min_new_tokens = max_new_tokens
    (fixed length, EOS suppressed while sampling) the policy is scored on the same EOS-free distribution."""
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", min_new_tokens=min_new_tokens, max_grad_norm=0.0))
    cfg = run.cfg
    prompts = trainer.local_prompts(run, 0)
    rollout = trainer.do_rollouts(run, prompts, (), 0)
    rewards = trainer.score(run, prompts, rollout)
    with torch.no_grad():
        old = trainer.batch_logprobs(run, run.model, rollout, 8)
    h, hm = trainer.importance_weights(old, rollout.behavior_logprobs, rollout.completion_mask, "base")
    mask = rollout.completion_mask
    assert torch.allclose(h[mask.bool()], torch.ones(int(mask.sum())), atol=1e-4)
    assert abs(hm["log_ratio_mean"]) < 1e-5 and hm["h_min"] > 1 - 1e-4
    adv = trainer.group_advantages(rewards, cfg.num_generations)
    # reference: -(1/T) sum_l A_i log pi(y_l) over all completion tokens of the batch
    run.model.zero_grad()
    lp = reference_logprobs(run.model, rollout, run.tokenizer.eos_token_id, min_new_tokens)
    torch.testing.assert_close(lp.detach() * mask, old * mask, rtol=0, atol=1e-5)
    (-(adv[:, None] * lp * mask).sum() / mask.sum()).backward()
    ref = {k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad()
    run.optimizer.step = lambda *a, **k: None  # keep the accumulated gradient for inspection
    run.optimizer.zero_grad = lambda *a, **k: None
    upd = trainer.update(run, rollout, adv, None, None)
    _, hm2 = trainer.importance_weights(upd.targets, rollout.behavior_logprobs, mask, "base")
    assert hm2["h_min"] > 1 - 1e-4 and abs(hm2["log_ratio_mean"]) < 1e-5  # the update's own forward as pi_old
    for k, g in ref.items():  # fp32 sums in another order (micro-batches grouped by length): rounding only
        torch.testing.assert_close(dict(run.model.named_parameters())[k].grad, g, rtol=1e-3, atol=5e-6)


def test_non_finite_loss_skips_the_update(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", skip_ratio=0.1))
    real = trainer.policy_loss
    monkeypatch.setattr(trainer, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    before = params(run.model)
    lr = run.scheduler.get_last_lr()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step")  # torch's, for a skipped first update
        m = trainer.rl_step(run, 0)
    assert m["skipped_update"] and m["loss"] is None
    assert all(torch.equal(before[k], v) for k, v in params(run.model).items())
    assert run.scheduler.last_epoch == 1 and run.scheduler.get_last_lr() != lr  # the schedule follows the steps


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Stands in for SIGKILL: the loop dies without saving."""


def kill_at_step_3(toy_dir, out, kw, monkeypatch) -> None:
    """A run that dies (no save) at the start of step 3, after the step-2 checkpoint."""
    real = trainer.rl_step

    def dies_at_step_3(run, step):
        if step == 2:
            raise Killed()
        return real(run, step)

    monkeypatch.setattr(trainer, "rl_step", dies_at_step_3)
    with pytest.raises(Killed):
        trainer.train(small_cfg(toy_dir, out, **kw))


def test_resume_reproduces_the_uninterrupted_run(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    kw = dict(steps=4, save_steps=2, skip_ratio=0.15, mitigation="base")
    full = trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    real = trainer.rl_step
    kill_at_step_3(toy_dir, tmp_path / "cut", kw, monkeypatch)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    monkeypatch.setattr(trainer, "rl_step", real)
    resumed = trainer.train(small_cfg(toy_dir, tmp_path / "cut", resume=True, **kw))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["skip_set"] for m in a] == [m["skip_set"] for m in b]
    for x, y in zip(a, b):
        for key in ("reward_mean", "loss", "h_mean", "log_ratio_mean", "tokens_generated"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-7), key
    assert full["tokens_processed"] == resumed["tokens_processed"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "full/final/model.safetensors"), load_file(tmp_path / "cut/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_ctrl_c_saves_a_checkpoint(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    real = trainer.rl_step

    def interrupted(run, step):
        if step == 1:
            raise KeyboardInterrupt
        return real(run, step)

    monkeypatch.setattr(trainer, "rl_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(small_cfg(toy_dir, tmp_path / "r", steps=3, save_steps=10))
    assert latest_checkpoint(tmp_path / "r").name == "step-000001"


def test_run_directory_contents(toy_dir, tmp_path):
    out = tmp_path / "r"
    summary = trainer.train(small_cfg(toy_dir, out, skip_ratio=0.05))
    metrics = read_metrics(out)
    required = {"step", "reward_mean", "reward_std", "loss", "skip_set", "num_skipped", "h_mean", "h_min", "h_max",
                "h_truncated_frac", "log_ratio_mean", "tokens_generated", "tokens_processed", "rollout_s",
                "update_s", "step_s", "tokens_per_s"}
    assert len(metrics) == 2 and required <= set(metrics[0])
    assert summary["token_speed"] == pytest.approx(summary["tokens_processed"] / summary["runtime_s"])
    assert (summary["first_reward"], summary["final_reward"]) == (metrics[0]["reward_mean"], metrics[-1]["reward_mean"])
    assert (out / "config.yaml").is_file() and (out / "final/model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


@pytest.mark.parametrize("kw,field", [
    (dict(skip_ratio=0.9, border=13), "valid layers"),
    (dict(num_generations=1), "num_generations"),
    (dict(mitigation="clip"), "mitigation='clip' is not one of base, practical, retrace"),
    (dict(lam=0.0), "lam"),
    (dict(dataset="nope"), "dataset='nope'"),
    (dict(loss_type="x", top_p=2.0), "top_p"),
    (dict(lora_r=-1), "lora_r=-1 must be >= 0"),
    (dict(lora_alpha=16.0), "lora_alpha=16.0 is used only with LoRA"),
    (dict(lora_target_modules=["q_proj"]), "lora_target_modules=.'q_proj'. is used only with LoRA"),
    (dict(lora_r=8, lora_alpha=0.0), "lora_alpha=0.0 must be > 0.0"),
    (dict(lora_r=8, lora_dropout=1.0), "lora_dropout=1.0 must be >= 0.0 and < 1.0"),
    (dict(lora_r=8, lora_dropout=0.1), "lora_dropout=0.1 would be switched off by disable_dropout=true"),
    (dict(lora_r=8, lora_target_modules=[]), "lora_target_modules is empty"),
    (dict(merge_lora=True), "merge_lora=True needs LoRA"),
    (dict(lora_r=8, lora_target_modules=["q_proj", "qproj"]), "'qproj' is not a module of the model"),
])
def test_bad_configs_fail_before_anything_is_written(toy_dir, tmp_path, kw, field):
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match=field):
        trainer.setup(small_cfg(toy_dir, out, **kw))
    assert not out.exists()


def test_model_without_layer_list_is_rejected(tmp_path, toy_dir):
    from transformers import MambaConfig, MambaForCausalLM

    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(toy_dir / "model"))
    MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    (toy_dir / "model" / "tokenizer.json").is_file()
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_dir / "model" / f, tmp_path / "mamba" / f)
    with pytest.raises(ConfigError, match="MambaForCausalLM has no recognisable transformer layer list"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", model=str(tmp_path / "mamba"), skip_ratio=0.1))


def test_model_that_cannot_be_nested_is_rejected_before_work_and_trains_at_x0(tmp_path, toy_dir):
    import shutil

    from conftest import tiny_hybrid
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(toy_dir / "model"))
    tiny_hybrid("jamba", num_hidden_layers=8, vocab_size=vocab).save_pretrained(tmp_path / "jamba")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_dir / "model" / f, tmp_path / "jamba" / f)
    with pytest.raises(ConfigError, match="JambaForCausalLM cannot be nested: its config's `layer_types`"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", model=str(tmp_path / "jamba"), skip_ratio=0.25))
    assert not (tmp_path / "r").exists()  # refused before the run directory was made
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r0", model=str(tmp_path / "jamba"), skip_ratio=0.0))
    assert run.num_layers == 8


def test_step_data_and_skip_sets_are_pure_functions_of_seed_and_step():
    cfg = TrainConfig(model="m", skip_ratio=0.1, seed=3)
    assert [trainer.step_skip_set(cfg, 28, s) for s in range(5)] == [trainer.step_skip_set(cfg, 28, s) for s in range(5)]
    idx = [i for s in range(5) for i in trainer.step_prompt_indices(10, 4, s, 3)]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))  # epochs cover the data


@pytest.mark.parametrize("schedule,last", [("constant", 1.0), ("linear", 0.0), ("cosine", 0.0)])
def test_every_schedule_warms_up_then_follows_its_shape(schedule, last):
    """warmup_ratio is honoured by every schedule (HF's own "constant" would ignore it)."""
    cfg = TrainConfig(model="m", steps=10, lr=1.0, lr_scheduler=schedule, warmup_ratio=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, lrs = trainer.make_scheduler(cfg, opt), []
    for _ in range(cfg.steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # 2 warm-up steps
    assert sched.get_last_lr()[0] == pytest.approx(last)


@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_the_same_skip_sets(toy_dir, tmp_path):
    """A real `kill -9` of the CLI process: at most the steps after the last checkpoint are lost."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    argv = [sys.executable, "-m", "nested_reft", "train", "--model", str(toy_dir / "model"), "--dataset", "toy",
            "--data-dir", str(toy_dir / "data"), "--output-dir", str(out), "--steps", "6", "--batch-size", "2",
            "--micro-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--min-new-tokens", "4",
            "--skip-ratio", "0.1", "--save-steps", "1", "--progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(out) is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    done = int(ckpt.name.split("-")[1])
    subprocess.run(argv + ["--resume", "true"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    cfg = TrainConfig(model="m", skip_ratio=0.1, seed=0)
    assert [m["skip_set"] for m in metrics] == [list(trainer.step_skip_set(cfg, 28, s)) for s in range(6)]
    assert done >= 1 and (out / "final/model.safetensors").is_file()


def test_ppo_iterations_reuse_one_rollout(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    """num_iterations = 2: pi_old is scored once before the update, the optimizer steps twice, and the
    second pass sees a ratio pi_theta / pi_old away from 1 (so clipping can act)."""
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", num_iterations=2, skip_ratio=0.15, mitigation="retrace"))
    steps = []
    real_step = run.optimizer.step
    monkeypatch.setattr(run.optimizer, "step", lambda *a, **k: (steps.append(1), real_step(*a, **k))[1])
    before = params(run.model)
    m = trainer.rl_step(run, 0)
    assert len(steps) == 2 and not m["skipped_update"]
    assert any(not torch.equal(before[k], v) for k, v in params(run.model).items())
    assert 0 < m["h_mean"] <= 1.0 + 1e-6 and "clip_frac" in m


def test_gradient_checkpointing_gives_the_same_update(toy_dir, tmp_path, alternating_rewards):
    """Recomputing activations in the backward pass changes memory, not the math: same rollout, same
    update. Rollouts run in eval mode, so generation keeps its KV cache."""
    plain = trainer.setup(small_cfg(toy_dir, tmp_path / "a", skip_ratio=0.15, mitigation="retrace"))
    ckpt = trainer.setup(small_cfg(toy_dir, tmp_path / "b", skip_ratio=0.15, mitigation="retrace",
                                   gradient_checkpointing=True))
    model = ckpt.accelerator.unwrap_model(ckpt.model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    m_plain, m_ckpt = trainer.rl_step(plain, 0), trainer.rl_step(ckpt, 0)
    assert m_plain["reward_mean"] == m_ckpt["reward_mean"] and m_plain["tokens_generated"] == m_ckpt["tokens_generated"]
    assert m_ckpt["loss"] == pytest.approx(m_plain["loss"], rel=1e-5, abs=1e-7)
    a, b = params(plain.model), params(ckpt.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; start and leave this test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_autocast_step_runs_and_keeps_fp32_weights(toy_dir, tmp_path, alternating_rewards, fresh_accelerate_state):
    """--bf16 true runs rollouts and update under bf16 autocast (CPU here, CUDA on a GPU): the master
    weights stay float32, the step changes them and they stay finite; with nothing skipped the
    behaviour and target log-probs agree to bf16 rounding, so h is 1 within a few percent."""
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", bf16="true"))
    assert run.accelerator.mixed_precision == "bf16"
    before = params(run.model)
    m = trainer.rl_step(run, 0)
    after = params(run.model)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    assert not m["skipped_update"] and m["num_skipped"] == 0
    assert abs(m["h_mean"] - 1) < 0.05 and abs(m["log_ratio_mean"]) < 0.05


# ---- review fixes (issue 13) ----------------------------------------------------------------------


def bang_tokenizer():
    """A word-level tokenizer whose id 0 is an ordinary token, "!" (as in Qwen2 and Llama-3 vocabularies)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["!", "<eos>", "<pad>", "####", "The", "answer", "is", "13", "13.", "7"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("text", ["The answer is 13.", "#### 13"])
def test_rewards_read_only_the_tokens_up_to_eos(text):
    """Padding after EOS must not reach the reward: masked-out ids (here id 0, "!") are not decoded."""
    from types import SimpleNamespace

    from nested_reft.rollout import Rollout, completion_texts

    tok = bang_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    width = len(ids) + 3
    comp = torch.tensor([ids + [tok.pad_token_id] * 3, [7] * width])  # row 2: nothing up to EOS is "13"
    mask = torch.tensor([[1] * len(ids) + [0] * 3, [1] * width])
    rollout = Rollout(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), comp, mask,
                      torch.zeros(2, width), (), 2, int(mask.sum()), 0.0)
    run = SimpleNamespace(cfg=SimpleNamespace(num_generations=2), tokenizer=tok)
    prompts = [trainer.Prompt([1], "13", [])]
    assert trainer.score(run, prompts, rollout).tolist() == [1.0, 0.0]
    assert completion_texts(tok, rollout)[0] == text


def test_clip_frac_and_kl_cover_every_micro_batch(toy_dir, tmp_path, monkeypatch, alternating_rewards):
    """Metrics of the update are token-weighted over all micro-batches, not the last one's."""
    real = trainer.policy_loss
    calls = []

    def fake(*a, **k):
        loss, extra = real(*a, **k)
        calls.append(1)
        return loss, {**extra, "clip_frac": 1.0 if len(calls) == 1 else 0.0}

    monkeypatch.setattr(trainer, "policy_loss", fake)
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", min_new_tokens=8))  # fixed length: equal token counts
    m = trainer.rl_step(run, 0)
    assert len(calls) == 2 and m["clip_frac"] == pytest.approx(0.5)


OFFPOLICY_KEYS = ("rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/kl_old_behavior", "rollout_corr/chi2_token", "rollout_corr/chi2_seq",
                  "rollout_corr/ess_token", "rollout_corr/ess_seq", "rollout_corr/ratio_outside_frac",
                  "rollout_corr/max_abs_log_ratio", "sampling/sampling_logp_difference/mean",
                  "sampling/sampling_logp_difference/max", "sampling/importance_sampling_ratio/min",
                  "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/max",
                  "h_capped_frac", "h_masked_frac")


@pytest.mark.parametrize("mitigation, skip_ratio", [("tis", 0.15), ("mis", 0.15), ("base", 0.0)])
def test_tis_mis_and_offpolicy_metrics_are_logged(toy_dir, tmp_path, alternating_rewards, mitigation, skip_ratio):
    out = tmp_path / "r"
    summary = trainer.train(small_cfg(toy_dir, out, steps=1, batch_size=2, rollout_batch_size=2, num_generations=2,
                                      max_new_tokens=4, min_new_tokens=4, mitigation=mitigation,
                                      skip_ratio=skip_ratio, is_cap=1.5))
    m = read_metrics(out)[0]
    for key in OFFPOLICY_KEYS:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["sampling/importance_sampling_ratio/mean"] == m["h_mean"]
    if mitigation == "tis":
        assert m["h_max"] <= 1.5 + 1e-6 and m["h_masked_frac"] == 0.0
    if mitigation == "mis":
        assert m["h_capped_frac"] == 0.0
    assert summary["offpolicy_kl_k3_mean"] == pytest.approx(m["rollout_corr/k3_kl"])
    assert summary["offpolicy_ess_token_mean"] == pytest.approx(m["rollout_corr/ess_token"])
    if skip_ratio == 0:  # the nested model is the policy: no off-policyness to report
        assert abs(m["rollout_corr/kl"]) < 1e-6 and abs(m["rollout_corr/k3_kl"]) < 1e-6
        assert abs(m["rollout_corr/ess_token"] - 1) < 1e-6 and abs(m["rollout_corr/ess_seq"] - 1) < 1e-6
        assert m["rollout_corr/ratio_outside_frac"] == 0.0
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["offpolicy_sums"]["offpolicy_kl_k3_mean"][1] == 1  # kept for a resume
    assert metrics.run_mean({}, "offpolicy_kl_k3_mean") is None  # a checkpoint from before these metrics


def test_metrics_under_trl_names_and_group_std(toy_dir, tmp_path, alternating_rewards):
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", beta=0.1))
    m = trainer.rl_step(run, 0)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert key in m, key
    # alternating rewards 1,0,1,0 in every group of 4: unbiased group std sqrt(1/3); batch std of 16 is smaller
    assert m["reward_std"] == pytest.approx((1 / 3) ** 0.5) and m["frac_reward_zero_std"] == 0.0
    assert m["reward_std_batch"] == pytest.approx(torch.tensor([1.0, 0.0] * 8).std().item())
    assert m["kl"] is not None and m["kl"] >= 0 and m["entropy"] > 0
    assert m["completions/mean_length"] == m["completion_len_mean"] == 8 and m["completions/clipped_ratio"] == 1.0


def test_entropy_is_the_policys_on_its_completion_tokens(toy_dir, tmp_path):
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", min_new_tokens=0))
    prompts = trainer.local_prompts(run, 0)
    rollout = trainer.do_rollouts(run, prompts, (), 0)
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    with torch.no_grad():
        logits = run.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    p, length = rollout.prompt_ids.size(1), rollout.completion_ids.size(1)
    logp = logits[:, p - 1:p - 1 + length].float().log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    cm = rollout.completion_mask.bool()
    expected = float(ent[cm].mean())
    upd = trainer.update(run, rollout, torch.zeros(rollout.completion_ids.size(0)), None, None)
    assert upd.means.reduce(run.accelerator)["entropy"] == pytest.approx(expected, rel=1e-4)


def test_runtime_is_the_whole_stage_including_checkpoints(toy_dir, tmp_path, monkeypatch):
    import time

    from nested_reft import checkpoint

    real = checkpoint.save_model
    monkeypatch.setattr(checkpoint, "save_model", lambda *a: (time.sleep(0.5), real(*a))[1])
    summary = trainer.train(small_cfg(toy_dir, tmp_path / "r", steps=2, save_steps=1))
    steps = sum(m["step_s"] for m in read_metrics(tmp_path / "r"))
    assert summary["runtime_s"] >= steps + 1.0  # two checkpoints and the final model, 0.5 s each
    assert summary["step_time_s"] == pytest.approx(steps)
    assert summary["token_speed"] == pytest.approx(summary["tokens_processed"] / summary["runtime_s"])


def test_completions_that_do_not_fit_the_context_are_refused_before_work(toy_dir, tmp_path):
    with pytest.raises(ConfigError, match="max_new_tokens=500.*max_position_embeddings=512"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", max_new_tokens=500, min_new_tokens=0))


def test_a_model_directory_without_tokenizer_files_is_refused(toy_dir, tmp_path):
    import shutil

    shutil.copytree(toy_dir / "model", tmp_path / "m")
    for f in tmp_path.joinpath("m").glob("*token*"):
        f.unlink()
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="tokenizer"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", model=str(tmp_path / "m")))


def test_the_run_stops_after_k_consecutive_skipped_updates(toy_dir, tmp_path, monkeypatch):
    real = trainer.policy_loss
    monkeypatch.setattr(trainer, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(trainer.TrainingError, match="3 consecutive"):
        trainer.train(small_cfg(toy_dir, tmp_path / "r", steps=6, max_skipped_updates=3))
    assert len(read_metrics(tmp_path / "r")) == 3


@pytest.fixture
def gpt2_dir(toy_dir, tmp_path):
    """A tiny GPT-2 (dropout 0.1 everywhere, its default) with the toy tokenizer."""
    import shutil

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=6, n_head=4,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "gpt2")
    for f in (toy_dir / "model").glob("*"):
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, tmp_path / "gpt2" / f.name)
    return tmp_path / "gpt2"


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_in_the_policy_unless_asked(toy_dir, tmp_path, gpt2_dir, disable):
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", model=str(gpt2_dir), disable_dropout=disable))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    run.model.train()
    with torch.no_grad():
        a, b = run.model(input_ids=ids).logits, run.model(input_ids=ids).logits
    assert torch.equal(a, b) == disable
    assert run.model.config.attn_pdrop == run.model.config.resid_pdrop == 0.1  # checkpoints keep the model's rates


def test_min_new_tokens_follows_max_new_tokens_unless_given():
    from nested_reft.config import resolve

    cfg = resolve(TrainConfig, None, {"model": "m", "max_new_tokens": 64})
    cfg.validate()
    assert cfg.min_new_tokens == 64
    assert resolve(TrainConfig, None, {"model": "m", "max_new_tokens": 64, "min_new_tokens": 0}).min_new_tokens == 0
    assert TrainConfig(model="m").min_new_tokens == 256


def test_saved_configs_keep_the_kv_cache_on(toy_dir, tmp_path):
    trainer.train(small_cfg(toy_dir, tmp_path / "r"))
    assert json.loads((tmp_path / "r/final/config.json").read_text())["use_cache"] is True
    assert json.loads((latest_checkpoint(tmp_path / "r") / "config.json").read_text())["use_cache"] is True


def test_a_data_set_smaller_than_the_batch_and_sequence_level_is_warn(toy_dir, tmp_path):
    with pytest.warns(UserWarning, match="fewer than batch_size"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "a", limit=2))
    with pytest.warns(UserWarning, match="high variance"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "b", is_level="sequence", skip_ratio=0.1))


def test_pyproject_license_is_an_spdx_string():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "MIT"


def test_importance_policy_profiles_logs_and_resumes_the_same_sets(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    kw = dict(steps=4, save_steps=2, skip_ratio=0.15, mitigation="retrace", skip_policy="importance",
              skip_temperature=0.3)
    trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    a = read_metrics(tmp_path / "full")
    assert all(len(m["layer_profile"]) == 28 and all(v >= 0 for v in m["layer_profile"]) for m in a)
    assert a[0]["layer_profile"] != a[1]["layer_profile"]  # refreshed from the update's forward pass
    for m in a:  # the logged set is the pure function of (seed, step, profile)
        from nested_reft.layer_skip import skip_set_at
        assert tuple(m["skip_set"]) == skip_set_at(28, 0.15, 1, 0, m["step"] - 1, "importance", m["layer_profile"], 0.3)
    real = trainer.rl_step
    kill_at_step_3(toy_dir, tmp_path / "cut", kw, monkeypatch)
    monkeypatch.setattr(trainer, "rl_step", real)
    trainer.train(small_cfg(toy_dir, tmp_path / "cut", resume=True, **kw))
    b = read_metrics(tmp_path / "cut")
    assert [m["skip_set"] for m in a] == [m["skip_set"] for m in b]
    assert [m["layer_profile"] for m in a] == [m["layer_profile"] for m in b]


def test_update_profile_equals_block_influence_of_the_same_forward(toy_dir, tmp_path, alternating_rewards):
    """The profile the update measures is Block Influence over the completion tokens of its forward pass."""
    from nested_reft.importance import block_influence, measuring

    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", skip_ratio=0.15, skip_policy="importance"))
    prompts = trainer.local_prompts(run, 0)
    rollout = trainer.do_rollouts(run, prompts, (), 0)
    adv = trainer.group_advantages(trainer.score(run, prompts, rollout), 4)
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    att = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.completion_mask], 1)
    ref = block_influence(run.model, ids, att, mask, batch_size=64)
    run.optimizer.step = lambda *a, **k: None
    with measuring(run.model, True) as meter:
        trainer.update(run, rollout, adv, None, None, meter)
    assert trainer.reduce_profile(run, meter) == pytest.approx(ref, rel=1e-3, abs=1e-5)


def test_fixed_policy_skips_the_given_layers(toy_dir, tmp_path, alternating_rewards):
    trainer.train(small_cfg(toy_dir, tmp_path / "r", skip_ratio=0.15, skip_policy="fixed", skip_layers=[20, 3, 9, 15]))
    assert [m["skip_set"] for m in read_metrics(tmp_path / "r")] == [[3, 9, 15, 20]] * 2


@pytest.mark.parametrize("kw, message", [
    (dict(skip_policy="bogus"), "skip_policy='bogus'"),
    (dict(skip_policy="importance", skip_temperature=0.0), "skip_temperature=0.0"),
    (dict(skip_policy="importance", skip_temperature=float("nan")), "skip_temperature=nan"),
    (dict(skip_policy="fixed"), "needs skip_layers"),
    (dict(skip_policy="fixed", skip_layers=[0, 3, 9, 15]), "layer 0 is not a valid layer"),
    (dict(skip_policy="fixed", skip_layers=[3, 3, 9, 15]), "repeats a layer"),
    (dict(skip_policy="fixed", skip_layers=[3, 9]), "has 2 layers but skip_ratio=0.15 gives U=4"),
    (dict(skip_layers=[3, 9, 15, 20]), "used only by skip_policy=fixed"),
])
def test_bad_skip_policy_input_fails_before_writing(toy_dir, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", skip_ratio=0.15, **kw))
    assert not (tmp_path / "r").exists()


def test_tensorboard_gets_every_numeric_metric(toy_dir, tmp_path, alternating_rewards):
    pytest.importorskip("tensorboard", reason='the tensorboard extra: pip install -e ".[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=2, skip_ratio=0.15, mitigation="tis", report_to="tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout_corr/k3_kl", "rollout_corr/ess_token", "rollout_corr/kl_old_behavior", "reward", "h_mean",
            "clip_ratio/low_min"} <= tags
    first = read_metrics(out)[0]
    assert events.Scalars("rollout_corr/k3_kl")[0].value == pytest.approx(first["rollout_corr/k3_kl"], rel=1e-6)
    assert [e.step for e in events.Scalars("reward")] == [1, 2]


# ---- LoRA -----------------------------------------------------------------------------------------


def lora_cfg(toy_dir, out, **kw):
    pytest.importorskip("peft")
    return small_cfg(toy_dir, out, lora_r=8, **kw)


def test_lora_merge_rollouts_samples_what_the_adapters_sample(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    """Rollouts from the adapters folded into the weights: the same tokens as the adapter path (fp32), and
    the importance weights of a nothing-skipped run stay 1 to rounding; the update still trains the adapters."""
    runs = {merge: trainer.setup(lora_cfg(toy_dir, tmp_path / str(merge), lora_merge_rollouts=merge))
            for merge in (False, True)}
    for run in runs.values():
        with torch.no_grad():
            for name, p in run.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    prompts = trainer.local_prompts(runs[True], 0)
    entered = []
    real = trainer.merged_adapters

    def spy(model):
        entered.append(1)
        return real(model)

    monkeypatch.setattr(trainer, "merged_adapters", spy)
    plain, merged = (trainer.do_rollouts(runs[m], prompts, (), 0) for m in (False, True))
    assert entered == [1]  # only the run with the option merged its adapters
    assert torch.equal(plain.completion_ids, merged.completion_ids)
    torch.testing.assert_close(merged.behavior_logprobs, plain.behavior_logprobs, rtol=0, atol=1e-4)
    before = params(runs[True].model)
    metrics = trainer.rl_step(runs[True], 0)
    assert abs(metrics["h_mean"] - 1.0) < 1e-4
    after = params(runs[True].model)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)  # the adapters trained; the base stayed bit for bit


def test_cuda_graphs_reach_the_rollouts_of_a_training_run(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    """train --cuda-graphs decodes through decode_graphs (the CPU stand-in for a graph's capture here): the
    same skip sets, tokens and update as the eager loop."""
    from test_decode_graphs import Captures, graphed

    captures = Captures(record=False)
    metrics = {}
    for graphs in (False, True):
        if graphs:
            graphed(monkeypatch, captures)
            monkeypatch.setattr(trainer, "graphs_problem", lambda model, device: None)
        cfg = small_cfg(toy_dir, tmp_path / str(graphs), skip_ratio=0.15, mitigation="retrace", steps=1,
                        cuda_graphs=graphs)
        trainer.train(cfg, trainer.setup(cfg))
        metrics[graphs] = read_metrics(tmp_path / str(graphs))[0]
    assert captures.captures >= 1 and captures.replays > 0
    assert metrics[True]["skip_set"] == metrics[False]["skip_set"]
    for key in ("loss", "reward_mean", "h_mean", "tokens_generated"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], abs=1e-5), key


def test_cuda_graphs_on_cpu_are_refused_before_any_step(toy_dir, tmp_path):
    with pytest.raises(ConfigError, match="cuda_graphs=true needs a CUDA device"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", cuda_graphs=True, device="cpu"))
    assert not (tmp_path / "r").exists()


def test_lora_merge_rollouts_needs_lora():
    with pytest.raises(ConfigError, match=r"lora_merge_rollouts=true needs LoRA adapters \(lora_r > 0\)"):
        TrainConfig(model="m", lora_merge_rollouts=True).validate()


def test_lora_alpha_defaults_to_twice_the_rank():
    assert TrainConfig(model="m", lora_r=8).lora_alpha == 16.0 and TrainConfig(model="m").lora_alpha is None
    assert TrainConfig(model="m", lora_r=8, lora_alpha=4).lora_alpha == 4


def test_lora_trains_only_the_adapters(toy_dir, tmp_path, alternating_rewards):
    """Two nested steps: the optimizer holds only adapter parameters, every base weight is bit-identical
    afterwards, and the adapters of every layer that ran changed."""
    run = trainer.setup(lora_cfg(toy_dir, tmp_path / "r", skip_ratio=0.15))
    named = dict(run.model.named_parameters())
    adapters = {k for k in named if "lora_" in k}
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert adapters and in_optimizer == {id(named[k]) for k in adapters}
    assert all(named[k].requires_grad == (k in adapters) for k in named)
    before = params(run.model)
    skips = [set(trainer.rl_step(run, step)["skip_set"]) for step in range(2)]
    after = params(run.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in adapters)
    ran = set(range(28)) - (skips[0] & skips[1])
    changed = {k for k in adapters if not torch.equal(before[k], after[k])}
    assert {k for k in adapters if "lora_B" in k and int(k.split(".layers.")[1].split(".")[0]) in ran} <= changed
    assert len(changed) > len(adapters) // 2


def test_lora_reference_is_the_base_with_the_adapters_disabled(toy_dir, tmp_path, alternating_rewards):
    """beta > 0 with LoRA loads no second model: the reference is the policy inside disable_adapter(). At step
    1 the adapters are still 0 (B = 0), so the KL is 0; after the update the reference's log-probs are those of
    a freshly loaded base model, not the policy's, and the KL is positive."""
    from nested_reft.models import load_model_and_tokenizer

    run = trainer.setup(lora_cfg(toy_dir, tmp_path / "r", beta=0.5))
    assert run.ref_model is None
    m1 = trainer.rl_step(run, 0)
    assert m1["kl"] == pytest.approx(0.0, abs=1e-7)
    rollout = trainer.do_rollouts(run, trainer.local_prompts(run, 1), (), 1)
    base, _ = load_model_and_tokenizer(str(toy_dir / "model"))
    mask = rollout.completion_mask
    with torch.no_grad():
        ref = trainer.reference_logprobs(run, rollout, 8)
        policy = trainer.batch_logprobs(run, run.model, rollout, 8)
        want = trainer.batch_logprobs(run, base, rollout, 8)
    torch.testing.assert_close(ref * mask, want * mask, rtol=0, atol=1e-5)
    assert ((policy - ref) * mask).abs().max() > 1e-4
    assert trainer.rl_step(run, 1)["kl"] > 0


def test_lora_nested_runs_draw_the_same_skip_sets_as_full_fine_tuning(toy_dir, tmp_path, alternating_rewards):
    """x = 0.15 with the importance policy, whose draw depends on the Block Influence measured through the
    wrapper: a fresh adapter (B = 0) is the base model, so step 1 (rollouts, loss, profile) and the profile
    measured in its update, hence step 2's skip set, equal the full fine-tuning run's."""
    kw = dict(skip_ratio=0.15, skip_policy="importance", skip_temperature=0.3, mitigation="retrace")
    trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    summary = trainer.train(lora_cfg(toy_dir, tmp_path / "lora", **kw))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "lora")
    assert [m["skip_set"] for m in a] == [m["skip_set"] for m in b] and all(len(m["skip_set"]) == 4 for m in b)
    for x, y in zip(a, b):
        assert y["layer_profile"] == pytest.approx(x["layer_profile"], rel=1e-5)
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5) and b[0]["reward_mean"] == a[0]["reward_mean"]
    assert summary["lora_r"] == 8 and 0 < summary["trainable_parameters"] < 1_759_552 / 2


def test_lora_with_gradient_checkpointing_gives_the_same_update(toy_dir, tmp_path, alternating_rewards):
    plain = trainer.setup(lora_cfg(toy_dir, tmp_path / "a", skip_ratio=0.15))
    ckpt = trainer.setup(lora_cfg(toy_dir, tmp_path / "b", skip_ratio=0.15, gradient_checkpointing=True))
    before = params(plain.model)
    m_plain, m_ckpt = trainer.rl_step(plain, 0), trainer.rl_step(ckpt, 0)
    assert m_ckpt["loss"] == pytest.approx(m_plain["loss"], rel=1e-5, abs=1e-7)
    a, b = params(plain.model), params(ckpt.model)
    assert any(not torch.equal(before[k], a[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_with_fsdp_or_without_peft_is_refused_before_any_work(toy_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(trainer, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    with monkeypatch.context() as env:
        env.setenv("ACCELERATE_USE_FSDP", "true")
        env.setenv("FSDP_VERSION", "2")
        with pytest.raises(ConfigError, match="lora_r=8: LoRA with FSDP is not supported"):
            trainer.setup(small_cfg(toy_dir, tmp_path / "r", lora_r=8))
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r'lora_r=8 needs the peft package: pip install -e "\.\[peft\]"'):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", lora_r=8))
    assert not (tmp_path / "r").exists()

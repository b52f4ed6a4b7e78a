import json
import math

import pytest
import torch

from nested_reft import trainer
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
        old = trainer.full_logprobs(run, run.model, rollout, batch_size=8)
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
    *_, hm2 = trainer.update(run, rollout, adv, None, None)
    assert hm2["h_min"] > 1 - 1e-4 and abs(hm2["log_ratio_mean"]) < 1e-5  # the update's own forward as pi_old
    for k, g in ref.items():
        torch.testing.assert_close(dict(run.model.named_parameters())[k].grad, g, rtol=1e-3, atol=1e-6)


def test_non_finite_loss_skips_the_update(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    run = trainer.setup(small_cfg(toy_dir, tmp_path / "r", skip_ratio=0.1))
    real = trainer.policy_loss
    monkeypatch.setattr(trainer, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    before = params(run.model)
    m = trainer.rl_step(run, 0)
    assert m["skipped_update"] and m["loss"] is None
    assert all(torch.equal(before[k], v) for k, v in params(run.model).items())


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Stands in for SIGKILL: the loop dies without saving."""


def test_resume_reproduces_the_uninterrupted_run(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    kw = dict(steps=4, save_steps=2, skip_ratio=0.15, mitigation="base")
    full = trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    real = trainer.rl_step

    def dies_at_step_3(run, step):
        if step == 2:
            raise Killed()
        return real(run, step)

    monkeypatch.setattr(trainer, "rl_step", dies_at_step_3)
    with pytest.raises(Killed):
        trainer.train(small_cfg(toy_dir, tmp_path / "cut", **kw))
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
])
def test_bad_configs_fail_before_anything_is_written(toy_dir, tmp_path, kw, field):
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match=field):
        trainer.setup(small_cfg(toy_dir, out, **kw))
    assert not out.exists()


def test_model_without_layer_list_is_rejected(tmp_path, toy_dir):
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    (toy_dir / "model" / "tokenizer.json").is_file()
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_dir / "model" / f, tmp_path / "mamba" / f)
    with pytest.raises(ConfigError, match="MambaForCausalLM has no recognisable transformer layer list"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", model=str(tmp_path / "mamba"), skip_ratio=0.1))


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

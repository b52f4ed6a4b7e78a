"""checkpoint.py: checkpoints hold exactly the state after the step they name; interrupted, torn, stuck or
changed run directories are resumed, restarted or refused with a clear message."""

import errno
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import params, read_metrics, small_cfg

from nested_reft import checkpoint, cli, trainer
from nested_reft.checkpoint import latest_checkpoint
from nested_reft.config import ConfigError


@pytest.fixture(autouse=True)
def alternating(monkeypatch):
    monkeypatch.setattr(trainer, "math_reward", lambda texts, answers, alts: [float(i % 2 == 0) for i in range(len(texts))])


def final_weights(out):
    return load_file(out / "final/model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_the_state_after_its_step_when_ctrl_c_lands_after_the_update(toy_dir, tmp_path, monkeypatch):
    """Ctrl-C after the optimizer stepped (here: during step 2's bookkeeping) is deferred to the end of that
    step: the checkpoint is labelled step 2 and resuming it gives the uninterrupted run's weights."""
    kw = dict(steps=3, save_steps=10, skip_ratio=0.15, mitigation="retrace")
    trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    real = trainer.finish_update

    def sigint_after_the_update(run):
        out = real(run)
        if run.scheduler.last_epoch == 1:  # inside step 2 (0-based 1), after its optimizer step
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "finish_update", sigint_after_the_update)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(small_cfg(toy_dir, tmp_path / "cut", **kw))
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [1, 2]
    monkeypatch.setattr(trainer, "finish_update", real)
    trainer.train(small_cfg(toy_dir, tmp_path / "cut", resume=True, **kw))
    assert same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut"))


def test_ctrl_c_during_a_rollout_saves_the_last_finished_step_at_once(toy_dir, tmp_path, monkeypatch):
    real = trainer.do_rollouts

    def interrupted(run, prompts, skip, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(run, prompts, skip, step)

    monkeypatch.setattr(trainer, "do_rollouts", interrupted)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a background launcher
    with pytest.raises(KeyboardInterrupt):
        trainer.train(small_cfg(toy_dir, tmp_path / "r", steps=3, save_steps=10))
    assert latest_checkpoint(tmp_path / "r").name == "step-000001"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_a_run_without_a_complete_checkpoint_restarts(toy_dir, tmp_path, capsys):
    """A run that died before its first checkpoint (metrics, config, a half-written checkpoint) is
    started again, with or without --resume, and says so in one line."""
    for resume in (False, True):
        out = tmp_path / f"r{resume}"
        (out / "checkpoints" / ".tmp-step-000001").mkdir(parents=True)
        (out / "checkpoints" / ".tmp-step-000001" / "model.safetensors").write_bytes(b"partial")
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
        (out / "config.yaml").write_text("model: old\n")
        summary = trainer.train(small_cfg(toy_dir, out, resume=resume))
        assert summary["steps"] == 2 and [m["step"] for m in read_metrics(out)] == [1, 2]
        assert not (out / "checkpoints" / ".tmp-step-000001").exists()
        assert "no complete checkpoint" in capsys.readouterr().err


def test_a_finished_or_checkpointed_run_is_not_overwritten_without_resume(toy_dir, tmp_path):
    trainer.train(small_cfg(toy_dir, tmp_path / "r"))
    with pytest.raises(ConfigError, match="already holds a run"):
        trainer.train(small_cfg(toy_dir, tmp_path / "r"))


def test_resume_drops_a_torn_last_metrics_line(toy_dir, tmp_path, capsys):
    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=3, save_steps=1, keep_checkpoints=5))
    for ckpt in ("step-000003",):
        import shutil

        shutil.rmtree(out / "checkpoints" / ckpt)
    (out / "summary.json").unlink()
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: len(text) - 30])  # the kill landed inside the last line
    trainer.train(small_cfg(toy_dir, out, steps=3, save_steps=1, keep_checkpoints=5, resume=True))
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert "torn" in capsys.readouterr().err


def test_a_corrupt_line_inside_metrics_is_named(toy_dir, tmp_path):
    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=2, save_steps=1, keep_checkpoints=5))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("{not json\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="metrics.jsonl:1"):
        trainer.train(small_cfg(toy_dir, out, steps=3, resume=True))


def test_resume_refuses_a_changed_run_defining_field_and_allows_safe_ones(toy_dir, tmp_path):
    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=2, skip_ratio=0.1, save_steps=1))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        trainer.train(small_cfg(toy_dir, out, steps=3, skip_ratio=0.0, seed=7, resume=True))
    assert "skip_ratio: 0.1 -> 0.0" in str(err.value) and "seed: 0 -> 7" in str(err.value)
    assert (out / "config.yaml").read_text() == before
    summary = trainer.train(small_cfg(toy_dir, out, steps=3, skip_ratio=0.1, save_steps=2, keep_checkpoints=3, resume=True))
    assert summary["steps"] == 3 and summary["skip_ratio"] == 0.1


def test_output_dir_under_a_file_fails_before_the_model_loads(toy_dir, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(trainer, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match="afile.*not a directory"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "afile" / "run"))


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_temporary_checkpoint(toy_dir, tmp_path, monkeypatch, capsys):
    real = checkpoint.save_model

    def disk_full(run, path, model_sd):
        real(run, path, model_sd)
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "optimizer.pt"))

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    out = tmp_path / "r"
    argv = ["train", "--model", str(toy_dir / "model"), "--dataset", "toy", "--data-dir", str(toy_dir / "data"),
            "--output-dir", str(out), "--steps", "2", "--batch-size", "2", "--micro-batch-size", "2",
            "--num-generations", "2", "--max-new-tokens", "4", "--save-steps", "1", "--progress", "false"]
    assert cli.main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert len(err) == 1 and err[0].startswith("error: ") and "No space left on device" in err[0] and "checkpoint" in err[0]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_truncated_checkpoint_file_is_named_on_resume(toy_dir, tmp_path):
    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=2, save_steps=1, keep_checkpoints=3))
    (out / "summary.json").unlink()
    ckpt = latest_checkpoint(out)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="model.safetensors"):
        trainer.train(small_cfg(toy_dir, out, steps=3, resume=True))


def test_a_checkpoint_holds_exactly_its_step(toy_dir, tmp_path):
    """Every periodic checkpoint equals the weights the uninterrupted run had after that step."""
    out = tmp_path / "r"
    run = trainer.setup(small_cfg(toy_dir, out, steps=2, save_steps=1, keep_checkpoints=5))
    loop = trainer.Loop(run)
    loop.step(0)
    after_one = params(run.model)
    saved = load_file(latest_checkpoint(out) / "model.safetensors")
    assert latest_checkpoint(out).name == "step-000001"
    assert all(torch.equal(saved[k], v) for k, v in after_one.items() if k in saved)


@pytest.mark.slow
def test_sigkill_at_ten_random_instants_then_resume_gives_the_same_weights_bit_for_bit(toy_dir, tmp_path):
    """Fault injection: a CLI run with a checkpoint every step is killed with SIGKILL ten times, half of
    the kills while a checkpoint is being written; after each kill `--resume true` goes on. The final
    weights equal the uninterrupted run's bit for bit and every step is logged once."""
    import random
    import subprocess
    import sys
    import time

    def argv(out):
        return [sys.executable, "-m", "nested_reft", "train", "--model", str(toy_dir / "model"), "--dataset", "toy",
                "--data-dir", str(toy_dir / "data"), "--output-dir", str(out), "--steps", "40", "--batch-size", "2",
                "--micro-batch-size", "1", "--num-generations", "2", "--max-new-tokens", "6", "--skip-ratio", "0.15",
                "--mitigation", "retrace", "--lr", "1e-3", "--save-steps", "1", "--keep-checkpoints", "2",
                "--progress", "false", "--resume", "true"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(argv(tmp_path / "full"), check=True, timeout=600, **quiet)
    out, rng, mid_write = tmp_path / "cut", random.Random(0), 0
    for kill in range(10):
        before = latest_checkpoint(out)
        proc = subprocess.Popen(argv(out), **quiet)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and latest_checkpoint(out) == before:
            time.sleep(0.01)  # wait until this launch has made progress
        if kill % 2 == 0:  # then land inside the next checkpoint write
            while time.time() < deadline and proc.poll() is None and not list((out / "checkpoints").glob(".tmp-*")):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, "the run finished before all ten kills; give it more steps"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        mid_write += bool(list((out / "checkpoints").glob(".tmp-*")))
    subprocess.run(argv(out), check=True, timeout=600, **quiet)
    assert mid_write >= 1  # some kills did land while a checkpoint was being written
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 41))
    assert same_weights(final_weights(tmp_path / "full"), final_weights(out))
    assert not list((out / "checkpoints").glob(".tmp-*"))


def _cli_argv(toy_dir, out, *extra):
    return ["train", "--model", str(toy_dir / "model"), "--dataset", "toy", "--data-dir", str(toy_dir / "data"),
            "--output-dir", str(out), "--steps", "2", "--batch-size", "2", "--micro-batch-size", "2",
            "--num-generations", "2", "--max-new-tokens", "4", "--progress", "false", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


def test_a_full_disk_while_writing_metrics_is_one_line_exit_1(toy_dir, tmp_path, monkeypatch, capsys):
    def disk_full(self, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(trainer.MetricsLog, "write", disk_full)
    assert cli.main(_cli_argv(toy_dir, tmp_path / "r")) == 1
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "metrics.jsonl" in line


def test_safetensors_own_write_error_is_one_line_exit_1(toy_dir, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def refuse(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_model", refuse)
    out = tmp_path / "r"
    assert cli.main(_cli_argv(toy_dir, out, "--save-steps", "1")) == 1
    assert "StorageFull" in _one_error_line(capsys)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_diverged_weights_stop_the_cli_with_exit_1(toy_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "finish_update", lambda run: (float("nan"), False))
    assert cli.main(_cli_argv(toy_dir, tmp_path / "r", "--steps", "5", "--max-skipped-updates", "2")) == 1
    line = _one_error_line(capsys)
    assert "2 consecutive updates were skipped" in line
    assert "start again (no checkpoint yet)" in line  # no checkpoint to name


def test_non_finite_weights_are_never_checkpointed(toy_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "weights_finite", lambda *a: False)
    out = tmp_path / "r"
    assert cli.main(_cli_argv(toy_dir, out, "--save-steps", "1")) == 1
    line = _one_error_line(capsys)
    assert "weights are not finite" in line
    assert "start again (no checkpoint yet) with a lower lr" in line
    assert latest_checkpoint(out) is None


def test_saving_a_step_again_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    final, tmp = tmp_path / "step-000002", tmp_path / ".tmp-step-000002"
    for d, text in ((final, "old"), (tmp, "new")):
        d.mkdir()
        (d / "trainer_state.json").write_text(text)
    real = os.replace
    calls = []

    def killed_after_first_rename(src, dst):
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt  # a kill between the two renames

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.replace_dir(tmp, final)
    assert not final.exists() and (tmp_path / ".old-step-000002" / "trainer_state.json").read_text() == "old"
    monkeypatch.setattr(checkpoint.os, "replace", real)
    checkpoint.recover_replaced(final)  # the next start puts the old directory back under its name
    assert (final / "trainer_state.json").read_text() == "old" and not (tmp_path / ".old-step-000002").exists()
    checkpoint.replace_dir(tmp, final)
    assert (final / "trainer_state.json").read_text() == "new" and not (tmp_path / ".old-step-000002").exists()


def test_recover_replaced_drops_the_old_copy_when_the_new_one_is_in_place(tmp_path):
    final, old = tmp_path / "final", tmp_path / ".old-final"
    for d, text in ((final, "new"), (old, "old")):
        d.mkdir()
        (d / "x").write_text(text)
    checkpoint.recover_replaced(final)
    assert (final / "x").read_text() == "new" and not old.exists()
    checkpoint.recover_replaced(final)  # nothing to do is fine


def test_runtime_survives_a_resume(toy_dir, tmp_path):
    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=2, save_steps=1, keep_checkpoints=3))
    state = json.loads((out / "checkpoints/step-000001/trainer_state.json").read_text())
    first_step = read_metrics(out)[0]["step_s"]
    assert state["runtime_s"] >= first_step  # the step it names is in its runtime


# ---- LoRA -----------------------------------------------------------------------------------------


def adapter_weights(path):
    return load_file(path / "adapter_model.safetensors")


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_lora_checkpoint_holds_only_the_adapter_and_is_small(toy_dir, tmp_path):
    pytest.importorskip("peft")
    trainer.train(small_cfg(toy_dir, tmp_path / "full", steps=1, skip_ratio=0.15))
    trainer.train(small_cfg(toy_dir, tmp_path / "lora", steps=1, skip_ratio=0.15, lora_r=4))
    full, lora = latest_checkpoint(tmp_path / "full"), latest_checkpoint(tmp_path / "lora")
    names = {p.name for p in lora.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json", "tokenizer.json"} <= names and "model.safetensors" not in names
    assert all("lora_" in k for k in adapter_weights(lora))
    # rank 4 on the 64-wide toy: 157,696 adapter parameters, 9% of the model's 1.76 M (the toy's width makes
    # this share far larger than on a real model: 0.3% at rank 4 on Qwen2.5-1.5B); with their Adam moments
    # the checkpoint is about a tenth of the full one
    assert (lora / "adapter_model.safetensors").stat().st_size < 0.1 * (full / "model.safetensors").stat().st_size
    assert dir_bytes(lora) < 0.15 * dir_bytes(full)
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "merged").exists()


def test_a_lora_run_resumes_to_bit_identical_adapter_weights(toy_dir, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint and resumed, a LoRA run ends with exactly the adapter (and merged
    model) of the uninterrupted run; the base weights are never written."""
    pytest.importorskip("peft")
    from test_trainer import kill_at_step_3

    kw = dict(steps=4, save_steps=2, skip_ratio=0.15, mitigation="retrace", lora_r=8, merge_lora=True)
    trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    real = trainer.rl_step
    kill_at_step_3(toy_dir, tmp_path / "cut", kw, monkeypatch)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    monkeypatch.setattr(trainer, "rl_step", real)
    trainer.train(small_cfg(toy_dir, tmp_path / "cut", resume=True, **kw))
    assert [m["skip_set"] for m in read_metrics(tmp_path / "full")] == [m["skip_set"] for m in read_metrics(tmp_path / "cut")]
    a, b = adapter_weights(tmp_path / "full" / "final"), adapter_weights(tmp_path / "cut" / "final")
    assert same_weights(a, b) and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    merged = [load_file(tmp_path / run / "final/merged/model.safetensors") for run in ("full", "cut")]
    assert same_weights(*merged)


def test_a_lora_resume_refuses_changed_lora_fields_and_allows_merge_lora(toy_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "r"
    trainer.train(small_cfg(toy_dir, out, steps=1, lora_r=8))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        trainer.train(small_cfg(toy_dir, out, steps=2, lora_r=4, resume=True))
    assert "lora_r: 8 -> 4" in str(err.value) and "lora_alpha: 16.0 -> 8.0" in str(err.value)
    with pytest.raises(ConfigError, match=r"lora_target_modules: \[.*\] -> \['q_proj'\]"):
        trainer.train(small_cfg(toy_dir, out, steps=2, lora_r=8, lora_target_modules=["q_proj"], resume=True))
    with pytest.raises(ConfigError, match="lora_r: 8 -> 0"):
        trainer.train(small_cfg(toy_dir, out, steps=2, resume=True))
    assert (out / "config.yaml").read_text() == before
    trainer.train(small_cfg(toy_dir, out, steps=2, lora_r=8, merge_lora=True, resume=True))
    assert (out / "final" / "merged" / "model.safetensors").is_file()

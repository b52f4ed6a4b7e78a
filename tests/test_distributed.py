"""Several processes on CPU (gloo), launched as subprocesses running the real CLI (tests/dist_worker.py):

- 2 processes and 1 process with the same global batch and seed draw the same skip sets and end with
  the same parameters after two RL steps. Tolerance: max |difference| <= 5e-4 = lr / 2 and mean
  |difference| <= 5e-8, for weights that moved by ~1e-3 on average. The processes all-reduce the
  gradient in a different order than one process accumulates it; Adam divides each entry by its own
  magnitude, so entries whose gradient is ~1e-8 (Adam's eps) turn those float32 rounding differences
  into differences of up to ~lr (measured: 1.6e-4 max, 2.3e-8 mean). Adam and clipping are insensitive
  to a global gradient scale, so the pre-clipping grad_norm and the loss are compared too.
- A process that dies makes the other exit non-zero with a clear error (gloo notices the closed
  connection at once), and the run resumes from its last checkpoint on 2 processes to the same result.
- A process that stalls (sockets still open) makes the other exit after collective_timeout_s.
- `nested-reft sft` shards the examples over the processes and writes one checkpoint.
- FSDP2 (the environment `accelerate launch` sets for `fsdp_version: 2`): 2 processes with sharded
  parameters and 1 process draw the same skip sets and tokens, and end with the same parameters to
  the same tolerance (measured: 9.6e-5 max, 7.7e-9 mean; the reduce-scatter sums in yet another
  order and Adam amplifies the rounding of near-zero gradients as above). Its checkpoints load as plain HF models with the 1-process keys, and a
  resume from step 1 under FSDP repeats step 2 exactly (same metrics, bit-identical weights).

The failure tests start the two processes themselves (torchrun's environment variables, no torchrun):
torchrun would SIGTERM the survivor as soon as one worker exits non-zero, hiding whether it stops on
its own. Each subprocess has a hard timeout, so a hang fails the test instead of blocking CI.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nested_reft.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("dist_worker.py"))
LIMIT_S = 300  # per subprocess; a hang fails the test instead of blocking CI


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("NESTED_REFT_TEST_")}
    out.update(OMP_NUM_THREADS="1", NESTED_REFT_TEST_REWARDS="alternating", **extra)
    return out


def train_args(toy, out, **kw) -> list[str]:
    cfg = dict(model=toy / "model", dataset="toy", data_dir=toy / "data", output_dir=out, steps=2, batch_size=4,
               micro_batch_size=2, rollout_batch_size=4, num_generations=4, max_new_tokens=8, min_new_tokens=8,
               lr=1e-3, save_steps=1, progress="false", seed=0, skip_ratio=0.15, device="cpu")
    cfg.update(kw)
    return ["train"] + [a for k, v in cfg.items() for a in ("--" + k.replace("_", "-"), str(v))]


def torchrun(args: list[str], nproc: int = 2, **extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER, *args]
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=LIMIT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(args: list[str], logs: Path, **extra) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Ranks 0 and 1 as plain processes with torchrun's variables; output to logs/rank{r}.{out,err}."""
    logs.mkdir(parents=True, exist_ok=True)
    common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = []
    for rank in (0, 1):
        e = env(RANK=str(rank), LOCAL_RANK=str(rank), **common, **extra)
        with (logs / f"rank{rank}.out").open("w") as out, (logs / f"rank{rank}.err").open("w") as err:
            procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=e, stdout=out, stderr=err))
    return procs[0], procs[1]


def wait_for_text(path: Path, text: str, limit_s: float = LIMIT_S) -> None:
    end = time.monotonic() + limit_s
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < end, f"{text!r} never appeared in {path}"
        time.sleep(0.2)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, toy: Path, max_diff: float = 5e-4, mean_diff: float = 5e-8) -> None:
    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["skip_set"] == y["skip_set"] and len(x["skip_set"]) == 4
        for key in ("tokens_generated", "tokens_processed", "reward_mean", "reward_std"):
            assert x[key] == y[key], key
        for key in ("grad_norm", "h_mean", "log_ratio_mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), key
        # the loss sums advantage-weighted log-probs whose advantages cancel within each group (they sum
        # to 0), so its relative rounding error is far larger than the log-probs' own
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-6), "loss"
    wa, wb = load_file(one / "final/model.safetensors"), load_file(two / "final/model.safetensors")
    w0 = load_file(toy / "model/model.safetensors")
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    moved = torch.cat([(wa[k] - w0[k]).abs().flatten() for k in wa])
    assert float(moved.mean()) > 1e-4  # the comparison is not vacuous: the weights did change
    assert float(diff.max()) <= max_diff and float(diff.mean()) <= mean_diff, (float(diff.max()), float(diff.mean()))


@pytest.fixture(scope="module")
def one_process(toy_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    r = subprocess.run([sys.executable, WORKER, *train_args(toy_dir, out)], env=env(), capture_output=True,
                       text=True, timeout=LIMIT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["num_processes"] == 1
    return out


def test_two_processes_train_like_one(toy_dir, one_process, tmp_path):
    out = tmp_path / "two"
    r = torchrun(train_args(toy_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["num_processes"] == 2  # printed once, by process 0
    assert_same_training(one_process, out, toy_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_dead_process_stops_the_other_and_the_run_resumes(toy_dir, one_process, tmp_path):
    out = tmp_path / "two"
    rank0, rank1 = launch_pair(train_args(toy_dir, out, collective_timeout_s=120), tmp_path / "logs",
                               NESTED_REFT_TEST_FAIL="1:1:exit")  # rank 1 dies at the start of step 2
    assert rank1.wait(LIMIT_S) == 17
    died = time.monotonic()
    code = rank0.wait(LIMIT_S)
    waited = time.monotonic() - died
    err = (tmp_path / "logs/rank0.err").read_text()
    assert code == 1, err[-3000:]
    assert "error: process 0 of 2: a collective operation failed: another process died" in err
    assert "Connection closed by peer" in err
    assert waited < 60  # noticed long before collective_timeout_s=120: the connection closed
    assert latest_checkpoint(out).name == "step-000001" and not (out / "final").exists()

    r = torchrun(train_args(toy_dir, out, resume="true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_training(one_process, out, toy_dir)


def test_stalled_process_times_out_the_other(toy_dir, tmp_path):
    out = tmp_path / "two"
    rank0, rank1 = launch_pair(train_args(toy_dir, out, collective_timeout_s=5), tmp_path / "logs",
                               NESTED_REFT_TEST_FAIL="1:0:hang")  # rank 1 stops answering in step 1
    try:
        wait_for_text(tmp_path / "logs/rank1.err", "test hook: rank 1 fails (hang)")
        stalled = time.monotonic()
        code = rank0.wait(LIMIT_S)
        waited = time.monotonic() - stalled
    finally:
        rank1.kill()
        rank1.wait()
    err = (tmp_path / "logs/rank0.err").read_text()
    assert code == 1, err[-3000:]
    assert waited < 60  # rank 0's own step-1 rollout, then 5 s in the collective, then exit
    assert "collective_timeout_s=5 s" in err and "Timed out waiting 5000ms" in err


def test_sft_shards_the_examples_over_processes(toy_dir, tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "--model", str(toy_dir / "model"), "--dataset", "toy", "--data-dir", str(toy_dir / "data"),
            "--output-dir", str(out), "--epochs", "1", "--batch-size", "4", "--limit", "16", "--max-length", "128",
            "--json"]
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # printed once, by process 0
    assert summary["updates"] == 2  # 16 examples / (2 processes x 4); one process alone would make 4
    assert json.loads((out / "sft_summary.json").read_text())["updates"] == 2
    assert (out / "model.safetensors").is_file()


FSDP2 = dict(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")  # what `accelerate launch` sets for fsdp_version: 2


def test_fsdp2_trains_like_one_process_and_resumes(toy_dir, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    r = torchrun(train_args(toy_dir, out), **FSDP2)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["num_processes"] == 2 and summary["fsdp"] is True
    assert_same_training(one_process, out, toy_dir)
    ckpt = out / "checkpoints/step-000001"
    assert sorted(load_file(ckpt / "model.safetensors")) == sorted(
        load_file(one_process / "checkpoints/step-000001/model.safetensors"))  # tied lm_head left out
    assert AutoModelForCausalLM.from_pretrained(ckpt).config.architectures == ["Qwen2ForCausalLM"]

    resumed = tmp_path / "resumed"  # as if the run had died during step 2
    shutil.copytree(out, resumed)
    for name in ("checkpoints/step-000002", "final", "summary.json"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    r = torchrun(train_args(toy_dir, resumed, resume="true"), **FSDP2)
    assert r.returncode == 0, r.stderr[-3000:]
    timed = ("rollout_s", "update_s", "step_s", "tokens_per_s", "rollout_tokens_per_s")
    untimed = [[{k: v for k, v in m.items() if k not in timed} for m in read_metrics(d)] for d in (out, resumed)]
    assert untimed[0] == untimed[1]
    wa, wb = load_file(out / "final/model.safetensors"), load_file(resumed / "final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_importance_policy_draws_the_same_sets_on_two_processes(toy_dir, tmp_path):
    """The importance profile is measured on each process's rows and reduced over both: 2 processes and 1
    draw the same skip sets from (nearly) the same profile, step after step."""
    args = dict(skip_policy="importance", steps=3, save_steps=3)
    one = subprocess.run([sys.executable, WORKER, *train_args(toy_dir, tmp_path / "one", **args)], env=env(),
                         capture_output=True, text=True, timeout=LIMIT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(train_args(toy_dir, tmp_path / "two", **args))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["skip_set"] for m in a] == [m["skip_set"] for m in b] and len({tuple(m["skip_set"]) for m in a}) > 1
    for x, y in zip(a, b):
        assert x["layer_profile"] == pytest.approx(y["layer_profile"], rel=1e-4, abs=1e-6)

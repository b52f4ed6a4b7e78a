"""sweep.py: grid expansion, run names, validation before work, and skip / resume / restart of runs
(training, SFT and evaluation are replaced by fakes that write what the real ones write)."""

import json
from pathlib import Path

import pytest
import yaml

from nested_reft import cli, sweep
from nested_reft.config import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def write_spec(tmp_path, **kw) -> Path:
    spec = {"output_dir": str(tmp_path / "out"), "models": {"tiny": "some/model"}, "datasets": ["toy"],
            "data_dir": str(tmp_path / "data"), "skip_ratios": [0.05, 0.15], "mitigations": ["base", "retrace"],
            "train": {"steps": 3, "num_generations": 4, "batch_size": 2, "micro_batch_size": 2},
            "eval": {"benchmarks": ["toy"], "max_new_tokens": 8}}
    spec.update(kw)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def fakes(monkeypatch):
    """Replace train / run_eval / run_sft; record their calls."""
    calls = {"train": [], "eval": [], "sft": [], "fail": set()}

    def train(cfg):
        calls["train"].append((Path(cfg.output_dir).name, cfg.resume, cfg.model, cfg.border, cfg.skip_ratio, cfg.mitigation))
        if Path(cfg.output_dir).name in calls["fail"]:
            raise RuntimeError("boom")
        out = Path(cfg.output_dir)
        (out / "config.yaml").write_text(yaml.safe_dump({"model": cfg.model, "dataset": cfg.dataset, "skip_ratio": cfg.skip_ratio,
                                                         "border": cfg.border, "mitigation": cfg.mitigation}))
        (out / "summary.json").write_text(json.dumps({"token_speed": 100.0 * (1 + cfg.skip_ratio), "runtime_s": 10.0, "num_layers": 28}))
        return {}

    def run_eval(cfg):
        calls["eval"].append(cfg.model)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        summary = {"mean": 0.5, "benchmarks": {"toy": {"accuracy": 0.5}}}
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary))
        return summary

    def run_sft(cfg):
        calls["sft"].append(cfg.output_dir)
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "sft_summary.json").write_text("{}")
        return {}

    monkeypatch.setattr("nested_reft.trainer.train", train)
    monkeypatch.setattr("nested_reft.evaluate.run_eval", run_eval)
    monkeypatch.setattr("nested_reft.sft.run_sft", run_sft)
    return calls


def quiet(msg):
    pass


def test_grid_expansion_names_and_borders(tmp_path):
    jobs = sweep.plan(sweep.load_spec(write_spec(tmp_path)))
    assert [j.name for j in jobs] == ["tiny__toy__x0.00__base", "tiny__toy__x0.05__base", "tiny__toy__x0.05__retrace",
                                      "tiny__toy__x0.15__base", "tiny__toy__x0.15__retrace"]
    assert [j.cfg.border for j in jobs] == [0, 1, 1, 1, 1]
    assert all(j.cfg.steps == 3 and j.cfg.model == "some/model" and j.cfg.data_dir == str(tmp_path / "data") for j in jobs)
    assert jobs[0].out == tmp_path / "out" / "tiny__toy__x0.00__base"


def test_paper_grid(tmp_path):
    spec = sweep.load_spec(CONFIGS / "sweep-paper.yaml")
    jobs = sweep.plan(spec)
    assert len(jobs) == 2 * 3 * (3 * 3 + 1) and len(sweep.sft_jobs(spec)) == 6
    assert "Qwen2.5-Math-7B-Instruct__math12k__x0.15__retrace" in {j.name for j in jobs}
    base = [j for j in jobs if j.skip_ratio == 0]
    assert len(base) == 6 and all(j.cfg.border == 0 and j.mitigation == "base" for j in base)
    assert all(j.cfg.border == 1 and j.cfg.lr == 1e-6 and j.cfg.min_new_tokens == 256 for j in jobs if j.skip_ratio > 0)
    assert all(j.cfg.model.endswith(f"sft/{j.model}__{j.dataset}") for j in jobs)  # RL starts from the SFT checkpoint


def test_toy_grid_uses_the_toy_config():
    spec = sweep.load_spec(CONFIGS / "sweep-toy.yaml")
    jobs = sweep.plan(spec)
    toy = yaml.safe_load((CONFIGS / "toy.yaml").read_text())
    assert len(jobs) == 10 and all(j.cfg.max_new_tokens == toy["max_new_tokens"] and j.cfg.lr == toy["lr"] for j in jobs)
    from nested_reft.synthetic import TOY_SFT

    assert {k: spec.sft[k] for k in TOY_SFT} == TOY_SFT  # the same SFT warm-up as the demo


def test_list_of_models_gets_labels(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path, models=["Qwen/Qwen2.5-Math-1.5B-Instruct", "/ckpt/m2/"]))
    assert spec.models == {"Qwen2.5-Math-1.5B-Instruct": "Qwen/Qwen2.5-Math-1.5B-Instruct", "m2": "/ckpt/m2/"}


@pytest.mark.parametrize("change, message", [
    ({"skip_ratios": [0.0]}, "skip_ratios"),
    ({"mitigations": ["nope"]}, "mitigations"),
    ({"train": {"skip_ratio": 0.1}}, "set by the grid"),
    ({"train": {"lr": -1}}, "lr"),
    ({"eval": {"benchmark": ["toy"]}}, "eval: unknown"),
    ({"datasets": []}, "datasets"),
    ({"modles": {}}, "did you mean 'models'"),
])
def test_bad_specs_are_rejected_before_work(tmp_path, change, message, fakes):
    with pytest.raises(ConfigError, match=message):
        sweep.run_sweep(sweep.load_spec(write_spec(tmp_path, **change)), log=quiet)
    assert not fakes["train"] and not (tmp_path / "out").exists()


def test_dry_run_does_nothing(tmp_path, fakes):
    rows = sweep.run_sweep(sweep.load_spec(write_spec(tmp_path)), dry_run=True, log=quiet)
    assert [r["state"] for r in rows] == ["new"] * 5 and not fakes["train"] and not (tmp_path / "out").exists()


def test_runs_then_skips_finished_runs(tmp_path, fakes):
    spec = sweep.load_spec(write_spec(tmp_path))
    rows = sweep.run_sweep(spec, log=quiet)
    assert [r["result"] for r in rows] == ["ran"] * 5
    assert [c[1] for c in fakes["train"]] == [False] * 5 and len(fakes["eval"]) == 5
    assert json.loads((tmp_path / "out" / "tiny__toy__x0.15__retrace" / "run.json").read_text())["model"] == "tiny"
    again = sweep.run_sweep(spec, log=quiet)
    assert [r["state"] for r in again] == ["done"] * 5 and [r["result"] for r in again] == ["skipped"] * 5
    assert len(fakes["train"]) == 5 and len(fakes["eval"]) == 5  # nothing more


def test_resume_restart_and_eval_only(tmp_path, fakes):
    spec = sweep.load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    ckpt = out / "tiny__toy__x0.05__base" / "checkpoints" / "step-000002"  # a complete checkpoint: resume
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    started = out / "tiny__toy__x0.05__retrace"  # started, no complete checkpoint: restart from scratch
    (started / "checkpoints" / ".tmp-step-000002").mkdir(parents=True)
    (started / "metrics.jsonl").write_text('{"step": 1}\n')
    trained = out / "tiny__toy__x0.15__base"  # trained, not evaluated: eval only
    trained.mkdir(parents=True)
    (trained / "summary.json").write_text("{}")
    rows = {r["name"]: r for r in sweep.run_sweep(spec, log=quiet)}
    assert rows["tiny__toy__x0.05__base"]["state"] == "resume"
    assert rows["tiny__toy__x0.05__retrace"]["state"] == "restart"
    assert rows["tiny__toy__x0.15__base"]["state"] == "eval"
    calls = {c[0]: c[1] for c in fakes["train"]}
    assert calls == {"tiny__toy__x0.00__base": False, "tiny__toy__x0.05__base": True,
                     "tiny__toy__x0.05__retrace": False, "tiny__toy__x0.15__retrace": False}
    assert not (started / "metrics.jsonl").exists()  # the restarted run's partial files were cleared
    assert str(trained / "final") in fakes["eval"]


def test_sft_once_per_model_and_dataset_then_rl_from_it(tmp_path, fakes):
    spec = sweep.load_spec(write_spec(tmp_path, sft={"epochs": 1, "lr": 1e-3}, datasets=["toy", "svamp"]))
    rows = sweep.run_sweep(spec, log=quiet)
    assert [r["kind"] for r in rows[:2]] == ["sft", "sft"] and len(fakes["sft"]) == 2
    assert {c[2] for c in fakes["train"] if "__toy__" in c[0]} == {str(tmp_path / "out" / "sft" / "tiny__toy")}
    assert str(tmp_path / "out" / "sft" / "tiny__toy") in fakes["eval"]  # the SFT checkpoint is evaluated
    sweep.run_sweep(spec, log=quiet)
    assert len(fakes["sft"]) == 2  # not again


def test_a_failed_run_does_not_stop_the_grid(tmp_path, fakes, capsys):
    fakes["fail"].add("tiny__toy__x0.05__base")
    path = write_spec(tmp_path)
    assert cli.main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "tiny__toy__x0.05__base: failed: RuntimeError: boom" in out
    assert len(fakes["train"]) == 5  # the others ran


def test_cli_dry_run_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML's paths are relative to the current directory
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy.yaml").write_text((CONFIGS / "toy.yaml").read_text())
    assert cli.main(["sweep", str(CONFIGS / "sweep-toy.yaml"), "--dry-run"]) == 0
    assert "11 runs (1 SFT, 10 RL), 11 to do, 0 done" in capsys.readouterr().out
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["sweep", str(write_spec(tmp_path, skip_ratios=[2.0]))]) == 2
    assert "skip_ratios" in capsys.readouterr().err


def test_lockstep_training_equals_training_alone(toy_dir, tmp_path):
    """Two runs trained in lockstep write the same samples, skip sets and weights as each trained alone."""
    import torch
    from safetensors.torch import load_file

    from nested_reft.config import TrainConfig
    from nested_reft.trainer import train

    def cfg(out, x, m):
        return TrainConfig(model=str(toy_dir / "model"), dataset="toy", data_dir=str(toy_dir / "data"), output_dir=str(out),
                           skip_ratio=x, mitigation=m, steps=3, batch_size=2, micro_batch_size=2, rollout_batch_size=2,
                           num_generations=4, max_new_tokens=6, min_new_tokens=6, lr=1e-3, save_steps=2, progress=False)

    pairs = [(0.0, "base"), (0.15, "retrace")]
    for x, m in pairs:
        train(cfg(tmp_path / f"alone-{m}", x, m))
    sweep.train_lockstep([cfg(tmp_path / f"lock-{m}", x, m) for x, m in pairs])
    for _, m in pairs:
        alone, lock = tmp_path / f"alone-{m}", tmp_path / f"lock-{m}"
        rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (alone, lock)]
        assert [(r["skip_set"], r["reward_mean"], r["tokens_processed"]) for r in rows[0]] == \
               [(r["skip_set"], r["reward_mean"], r["tokens_processed"]) for r in rows[1]]
        assert json.loads((lock / "summary.json").read_text())["steps"] == 3
        w0, w1 = (load_file(d / "final" / "model.safetensors") for d in (alone, lock))
        assert all(torch.equal(w0[k], w1[k]) for k in w0)

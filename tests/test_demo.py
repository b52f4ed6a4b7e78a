"""demo.py: option checks, the toy RL settings kept equal to configs/toy.yaml, the output-directory guard,
and (slow) the whole pipeline with the --quick preset, then a rerun that only reports."""

import json
import time
from pathlib import Path

import pytest

from nested_reft import cli, demo
from nested_reft.config import TrainConfig, resolve

CONFIGS = Path(__file__).parent.parent / "configs"


def test_toy_rl_settings_match_configs_toy_yaml():
    cfg = resolve(TrainConfig, CONFIGS / "toy.yaml")
    assert cfg.dataset == "toy"
    assert {k: getattr(cfg, k) for k in demo.TOY_RL} == demo.TOY_RL
    assert cfg.min_new_tokens == 0  # EOS-terminated rollouts (see configs/toy.yaml)


def test_rollouts_fit_the_longest_toy_solution(tmp_path):
    """With the demo's data (the BPE merges depend on the training problems), every solution + EOS fits."""
    from transformers import AutoTokenizer

    from nested_reft.data import load_examples, sft_target
    from nested_reft.synthetic import build_toy

    cfg = demo.DemoConfig()
    toy_dir = tmp_path
    build_toy(toy_dir, seed=cfg.seed, num_train=cfg.num_train, num_test=cfg.num_test)
    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    longest = max(len(tok(sft_target(ex, "toy"), add_special_tokens=False)["input_ids"]) + 1
                  for split in ("train", "test") for ex in load_examples("toy", split, toy_dir / "data"))
    assert longest <= demo.TOY_RL["max_new_tokens"] <= demo.TOY_EVAL["max_new_tokens"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps"),
    (["--mitigations", "base", "nope"], "--mitigations"),
    (["--skip-ratio", "0"], "--skip-ratio"),
    (["--eval-limit", "0"], "--eval-limit"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--layer-drop", "1"], "--layer-drop"),
    (["--layer-drop", "nan"], "--layer-drop"),
])
def test_bad_options_exit_2_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_output_dir_with_other_options_is_refused(tmp_path):
    cfg = demo.DemoConfig(output_dir=str(tmp_path))
    demo.claim_output_dir(cfg)
    demo.claim_output_dir(cfg)  # same options: fine (a rerun continues)
    with pytest.raises(ValueError, match="steps: 12 -> 5"):
        demo.claim_output_dir(demo.DemoConfig(output_dir=str(tmp_path), steps=5))


def test_the_demo_is_a_one_ratio_sweep(tmp_path):
    from nested_reft.sweep import plan

    spec = demo.sweep_spec(demo.DemoConfig(output_dir=str(tmp_path), mitigations=["retrace"], skip_ratio=0.10))
    jobs = plan(spec)
    assert [(j.skip_ratio, j.cfg.border, j.mitigation) for j in jobs] == [(0.0, 0, "base"), (0.10, 1, "retrace")]
    assert all(j.cfg.model == str(tmp_path / "sft" / "toy-28L__toy") for j in jobs)


def test_demo_options_reach_the_sft_train_and_eval_configs(tmp_path):
    from nested_reft.sweep import plan

    cfg = demo.DemoConfig(output_dir=str(tmp_path), skip_policy="importance", eval_samples=3)
    spec = demo.sweep_spec(cfg)
    assert spec.sft["layer_drop"] == demo.DEMO_LAYER_DROP and spec.sft["epochs"] == demo.DEMO_SFT_EPOCHS
    assert spec.eval["num_samples"] == 3
    assert {j.cfg.skip_policy for j in plan(spec)} == {"importance"}
    plain = demo.sweep_spec(demo.DemoConfig(output_dir=str(tmp_path), layer_drop=0.0))
    assert plain.sft["layer_drop"] == 0.0 and plain.sft["epochs"] == 3  # the paper's plain SFT, TOY_SFT's epochs


def test_paired_stderr_is_the_se_of_per_problem_differences(tmp_path):
    rows = [{"benchmark": "toy", "problem_index": i, "reward": r} for i, rs in enumerate([[1, 1], [0, 1], [0, 0]]) for r in rs]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = demo.problem_scores(tmp_path)
    assert scores == [1.0, 0.5, 0.0] and demo.problem_scores(tmp_path / "missing") is None
    diffs = [1.0 - 1.0, 0.5 - 0.0, 0.0 - 0.0]
    mean = sum(diffs) / 3
    expected = (sum((d - mean) ** 2 for d in diffs) / 2 / 3) ** 0.5
    assert demo.paired_stderr(scores, [1.0, 0.0, 0.0]) == pytest.approx(expected)
    assert demo.paired_stderr(scores, [1.0, 0.0]) is None and demo.paired_stderr(None, scores) is None


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert cli.main(["demo", "--quick", "--output-dir", str(out)]) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "| baseline | 0.00 | 0 | 0 | base |" in printed and "token speed" in printed
    assert "| Nested-ReFT (uniform) | 0.15 | 4 | 1 | retrace |" in printed and "points of the baseline" in printed
    res = json.loads((out / "results.json").read_text())
    assert [(r["skip_ratio"], r["mitigation"]) for r in res["runs"]] == [(0.0, "base"), (0.15, "practical"), (0.15, "retrace")]
    assert [r["skipped_layers"] for r in res["runs"]] == [0, 4, 4]
    assert [r["skip_policy"] for r in res["runs"]] == [None, "uniform", "uniform"]
    assert all(r["accuracy_stderr"] is not None for r in res["runs"]) and res["runs"][0]["accuracy_delta_stderr"] is None
    assert all(r["accuracy_delta_stderr"] is not None for r in res["runs"][1:])
    assert all(r["token_speed"] > 0 and r["runtime_s"] > 0 and r["accuracy"] is not None for r in res["runs"])
    assert all(r["token_speed_rel_delta"] is not None for r in res["runs"][1:])
    assert res["sft"]["baseline_delta_stderr"] is not None
    assert res["sft"]["accuracy"] is not None and len(res["runs"][0]["reward_per_step"]) == demo.QUICK["steps"]
    for name in ("results.md", "demo_results.png", "demo_reward.png"):
        assert (out / name).stat().st_size > 0
    t0 = time.perf_counter()
    assert cli.main(["demo", "--quick", "--output-dir", str(out)]) == 0  # everything done: only the report
    assert time.perf_counter() - t0 < first / 2
    again = json.loads((out / "results.json").read_text())
    assert again["runs"][0]["token_speed"] == res["runs"][0]["token_speed"]
    assert res["wall_s"] < again["wall_s"] < res["wall_s"] + first / 2  # the rerun's time is added, not substituted

import json

import pytest

from nested_reft.bench import BenchConfig, run_bench, summarise
from nested_reft.cli import main

FIELDS = {"ratio", "num_layers", "skipped", "ideal_speedup", "measured_speedup", "efficiency",
          "full_tokens_per_s", "nested_tokens_per_s", "device"}


def test_summarise_computes_ideal_measured_and_efficiency():
    cfg = BenchConfig(ratios=[0.15], batch_size=2, num_generations=2, max_new_tokens=10)
    times = {"full": [2.0, 4.0, 3.0], 0.15: [2.5, 2.4, 9.0]}
    (row,) = summarise(times, cfg, 28, "cpu")
    assert row["skipped"] == 4 and row["ideal_speedup"] == pytest.approx(28 / 24)
    assert row["measured_speedup"] == pytest.approx(3.0 / 2.5)  # medians
    assert row["efficiency"] == pytest.approx((3.0 / 2.5) / (28 / 24))
    assert row["full_tokens_per_s"] == pytest.approx(40 / 3.0) and row["nested_tokens_per_s"] == pytest.approx(16)


def test_bench_cli_json_on_a_narrow_preset(capsys):
    rc = main(["bench", "--hidden-size", "32", "--skip-ratio", "0.05", "0.15", "--batch-size", "1",
               "--num-generations", "2", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0",
               "--compare-generate", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["ratio"] for r in rows] == [0.05, 0.15] and [r["skipped"] for r in rows] == [1, 4]
    assert FIELDS <= set(rows[0]) and rows[0]["num_layers"] == 28 and rows[0]["engine_vs_generate"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "gpt9"], "preset='gpt9' is unknown"),
    (["--skip-ratio", "0.9", "--border", "13", "--hidden-size", "32"], "valid layers"),
    (["--repeats", "0"], "repeats must be >= 1"),
    (["--cuda-graphs", "--device", "cpu", "--hidden-size", "32"], "cuda_graphs=true needs a CUDA device"),
])
def test_bench_bad_input_exits_2(argv, msg, capsys):
    assert main(["bench", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_profile_splits_the_rollout_time():
    from nested_reft.bench import build_preset, profile_rollout

    cfg = BenchConfig(batch_size=1, num_generations=2, max_new_tokens=3, prompt_len=4)
    shares = profile_rollout(build_preset("tiny-28", hidden_size=32).eval(), cfg)
    parts = {k: v for k, v in shares.items() if k != "total_s"}
    assert set(parts) == {"embedding", "layers", "lm_head", "other (sampling, masks, cache, Python)"}
    assert sum(parts.values()) == pytest.approx(1.0) and parts["layers"] > parts["embedding"] > 0


def test_summarise_steps_uses_the_share_adjusted_ideal_and_fits_the_gain():
    from nested_reft.bench import summarise_steps

    def steps(step, rollout):
        return [{"step_s": step, "rollout_s": rollout, "update_s": step - rollout}] * 3

    times = {0.0: steps(10.0, 6.0), 0.05: steps(9.5, 5.5), 0.10: steps(9.0, 5.0), 0.15: steps(8.5, 4.5)}
    out = summarise_steps(times, [0.05, 0.10, 0.15], 28, "cpu")
    first = out["rows"][0]
    assert first["rollout_share"] == pytest.approx(0.6) and first["skipped"] == 1
    assert first["ideal_speedup"] == pytest.approx(1 / (0.4 + 0.6 * 27 / 28))
    assert first["measured_speedup"] == pytest.approx(10 / 9.5)
    assert first["efficiency"] == pytest.approx((10 / 9.5) * (0.4 + 0.6 * 27 / 28))
    assert first["rollout_speedup"] == pytest.approx(6 / 5.5) and first["rollout_ideal"] == pytest.approx(28 / 27)
    gains = [0.0] + [100 * (10 / s - 1) for s in (9.5, 9.0, 8.5)]
    xs = [0.0, 0.05, 0.10, 0.15]
    slope = (sum((x - 0.075) * (g - sum(gains) / 4) for x, g in zip(xs, gains)) / sum((x - 0.075) ** 2 for x in xs))
    assert out["fit"]["slope_pct_per_x"] == pytest.approx(slope) and out["fit"]["points"] == 4
    assert 0.99 < out["fit"]["r2"] <= 1


def test_step_mode_runs_trains_own_steps(capsys):
    rc = main(["bench", "--mode", "step", "--hidden-size", "32", "--skip-ratio", "0.15", "--batch-size", "2",
               "--micro-batch-size", "1", "--num-generations", "2", "--max-new-tokens", "4", "--repeats", "1",
               "--warmup", "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["skipped"] == 4 and row["num_layers"] == 28 and 0 < row["rollout_share"] < 1
    assert row["full_step_s"] > row["full_rollout_s"] > 0 and row["efficiency"] > 0


def test_step_mode_bad_input_exits_2(capsys):
    assert main(["bench", "--mode", "step", "--batch-size", "3", "--micro-batch-size", "2"]) == 2
    assert "multiple of micro_batch_size" in capsys.readouterr().err
    assert main(["bench", "--mode", "step", "--compare-generate"]) == 2
    assert "are rollout-mode measurements" in capsys.readouterr().err


def test_step_speedup_pairs_each_round_so_drift_cancels():
    from nested_reft.bench import summarise_steps

    speed, gain = [3.0, 1.0, 2.0], [1.05, 1.1, 1.2]  # the machine's pace drifts between rounds
    full = [{"step_s": 10 * s, "rollout_s": 5 * s, "update_s": 5 * s} for s in speed]
    nested = [{"step_s": 10 * s / g, "rollout_s": 5 * s / g, "update_s": 5 * s} for s, g in zip(speed, gain)]
    out = summarise_steps({0.0: full, 0.15: nested}, [0.15], 28, "cpu")
    assert out["rows"][0]["measured_speedup"] == pytest.approx(1.1)  # the ratio of the medians would be 1.2
    assert out["rows"][0]["rollout_speedup"] == pytest.approx(1.1)


def test_bench_with_cuda_graphs_times_the_eager_loop_beside_them(capsys, monkeypatch):
    """--cuda-graphs: every engine variant decodes through decode_graphs (here with the CPU stand-in for a
    graph's capture), and the full model also decodes eagerly in the same rotation."""
    from test_decode_graphs import Captures, graphed

    from nested_reft import bench

    captures = Captures(record=False)
    graphed(monkeypatch, captures)
    monkeypatch.setattr(bench, "graphs_problem", lambda model, device: None)
    rc = main(["bench", "--hidden-size", "32", "--skip-ratio", "0.15", "--batch-size", "1", "--num-generations", "2",
               "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--cuda-graphs", "--floor"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "CUDA graphs vs the eager decode loop on the full model" in out and "without CUDA graphs" in out
    assert captures.captures == 2 and captures.replays == 2  # full and x = 0.15: 2 steps after the prefill each


def test_bench_refuses_a_model_that_cannot_be_nested(tmp_path, capsys):
    from conftest import tiny_hybrid

    tiny_hybrid("jamba", num_hidden_layers=8).save_pretrained(tmp_path / "jamba")
    assert main(["bench", "--model", str(tmp_path / "jamba"), "--skip-ratio", "0.25", "--repeats", "1"]) == 2
    assert "JambaForCausalLM cannot be nested" in capsys.readouterr().err


def test_bench_at_ratio_zero_runs_a_model_that_cannot_be_nested(tmp_path, capsys):
    from conftest import tiny_hybrid

    tiny_hybrid("jamba", num_hidden_layers=8).save_pretrained(tmp_path / "jamba")
    assert main(["bench", "--model", str(tmp_path / "jamba"), "--skip-ratio", "0", "--repeats", "1",
                 "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--json"]) == 0

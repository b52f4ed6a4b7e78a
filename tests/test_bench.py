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

import json
import math
from types import SimpleNamespace

import torch

from nested_reft.metrics import (OFFPOLICY_SUMMARY, Means, MetricsLog, accumulate_run, clipped_completions, nan_reduce,
                                 reward_stats, run_offpolicy_means)


def test_means_are_weighted_by_what_they_average_over():
    means = Means()
    means.add("clip_frac", 1.0, 3)  # 3 tokens, all clipped
    means.add("clip_frac", 0.0, 1)  # 1 token, none
    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    assert means.local("clip_frac") == 0.75 and math.isnan(means.local("absent"))
    assert means.reduce(acc) == {"clip_frac": 0.75}


def test_reward_stats_under_our_names_and_trls():
    stats = reward_stats(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert stats["reward"] == stats["reward_mean"] == 0.75
    assert stats["frac_reward_zero_std"] == 0.5  # the second group is all 1
    assert math.isclose(stats["reward_std_batch"], 0.5)  # torch's unbiased std of [1, 0, 1, 1]


def test_clipped_completions_reach_the_limit_without_eos():
    eos = 9
    ids = torch.tensor([[1, 2, 3], [1, eos, 0], [1, 2, eos], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert clipped_completions(ids, mask, [eos], max_new_tokens=3) == 1  # only row 0


def test_nan_reduce_ignores_processes_without_tokens():
    assert nan_reduce(torch.tensor([0.2, math.nan, 0.1]), torch.min) == torch.tensor(0.1).item()
    assert nan_reduce(torch.tensor([math.nan]), torch.max) is None


def test_run_totals_average_each_offpolicy_metric_over_the_steps_that_logged_it():
    state = {"tokens_processed": 0, "tokens_generated": 0, "rollout_s": 0.0, "skipped_updates": 0, "rewards": []}
    line = {"step_s": 2.0, "tokens_processed": 10, "tokens_generated": 6, "rollout_s": 1.0, "reward_mean": 0.5}
    accumulate_run(state, {**line, "skipped_update": True, "rollout_corr/kl": 0.2})
    accumulate_run(state, {**line, "skipped_update": True, "rollout_corr/kl": None})  # not finite: not counted
    accumulate_run(state, {**line, "skipped_update": False, "rollout_corr/kl": 0.4})
    assert state["tokens_processed"] == 30 and state["step_time_s"] == 6.0 and state["rewards"] == [0.5] * 3
    assert state["skipped_updates"] == 2 and state["consecutive_skipped"] == 0
    means = run_offpolicy_means(state)
    assert set(means) == set(OFFPOLICY_SUMMARY.values())
    assert math.isclose(means["offpolicy_kl_k1_mean"], 0.3) and means["offpolicy_ess_token_mean"] is None
    json.dumps(state)  # checkpoints carry it as JSON


def test_metrics_lines_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", True)
    log.write({"step": 1, "h_mean": float("nan"), "rho_max": float("inf"), "xs": [float("nan")]})

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    line = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse)
    assert line == {"step": 1, "h_mean": None, "rho_max": None, "xs": [None]}

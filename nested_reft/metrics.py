"""Per-step metrics of the RL loop: weighted means gathered over micro-batches and processes, reward and
completion statistics under our names and TRL's, and metrics.jsonl as strict JSON.

Choices:
- A mean over micro-batches or processes is weighted by what it averages over (tokens for per-token
  metrics such as clip fractions, entropy and KL; IS units for the importance weights), never the last
  micro-batch's value and never an unweighted mean of means; so N processes and gradient accumulation
  report what one process would for the same batch.
- TRL's names sit next to ours for what TRL users compare: `reward`, `reward_std` (the mean of the groups'
  standard deviations: what GRPO normalises by; TRL >= 1.0 logs the batch std under this name, which we
  log as `reward_std_batch`), `frac_reward_zero_std`, `completions/mean_length`,
  `completions/clipped_ratio` (completions that reached max_new_tokens without EOS), `kl` (beta > 0),
  `entropy` (of the policy on its completion tokens), `clip_ratio/{low,high,region}_mean`, and, as TRL
  computes them, `clip_ratio/low_min` and `clip_ratio/high_max`: the min and max over processes of each
  process's mean.
- metrics.jsonl is strict JSON: NaN and infinities are written as null (Python's json would write the
  bare, invalid `NaN`). One flushed, fsync'ed line per step, written by process 0.
- The run's totals for summary.json (tokens, rollout time, rewards, each off-policy metric's sum over the
  steps that logged it) live in a plain dict that checkpoints carry, so a resumed run's summary covers
  the whole run.
"""

import json
import math
import os
from pathlib import Path

import torch

from nested_reft.distributed import gather_rows
from nested_reft.objectives import group_reward_stats


class Means:
    """Weighted means accumulated piecewise: add(name, value, weight), then reduce() over processes.
    Every process must add the same names (they are reduced in sorted order)."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float, weight: float) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += float(value) * float(weight)
        s[1] += float(weight)

    def add_all(self, values: dict, weight: float, names=None) -> None:
        for name in names or values:
            if name in values:
                self.add(name, values[name], weight)

    def local(self, name: str) -> float:
        """This process's weighted mean of `name` (NaN where it has no weight)."""
        total, weight = self.sums.get(name, (0.0, 0.0))
        return total / weight if weight > 0 else math.nan

    def reduce(self, acc) -> dict[str, float | None]:
        """{name: global weighted mean} (None where the total weight is 0)."""
        names = sorted(self.sums)
        if not names:
            return {}
        rows = gather_rows(acc, [x for n in names for x in self.sums[n]]).sum(0)  # [2 * k]
        return {n: float(rows[2 * i] / rows[2 * i + 1]) if rows[2 * i + 1] > 0 else None for i, n in enumerate(names)}


def reward_stats(rewards: torch.Tensor, num_generations: int) -> dict[str, float]:
    """Reward metrics of the step's whole batch [B*G] (groups contiguous)."""
    stats = group_reward_stats(rewards, num_generations)  # reward_mean, reward_std, frac_reward_zero_std
    batch_std = float(rewards.double().std()) if rewards.numel() > 1 else 0.0
    return {**stats, "reward": stats["reward_mean"], "reward_std_batch": batch_std}


def clipped_completions(completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos: list[int],
                        max_new_tokens: int) -> int:
    """Completions that reached max_new_tokens without emitting EOS (TRL's 'clipped')."""
    lengths = completion_mask.sum(-1)  # [N]
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [N]
    ended = torch.isin(last, torch.tensor(eos, dtype=last.dtype)) & (lengths > 0)
    return int(((lengths >= max_new_tokens) & ~ended).sum())


def jsonable(value):
    """NaN and infinities as None, recursively through lists and dicts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl on the main process: starts from `kept` lines (a resumed run's), one flushed line per step."""

    def __init__(self, path: Path, enabled: bool, kept: list[dict] = ()):
        self.path, self.enabled = path, enabled
        if enabled:
            path.write_text("".join(json.dumps(jsonable(m), allow_nan=False) + "\n" for m in kept))

    def write(self, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(jsonable(metrics), allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


def nan_reduce(values: torch.Tensor, reduce) -> float | None:
    """reduce() over the non-NaN entries (a process with no completion tokens has none); None if all are."""
    values = values[~values.isnan()]
    return float(reduce(values)) if values.numel() else None


def make_tracker(cfg, out: Path, enabled: bool):
    """A `log(metrics, step)` callable for TensorBoard / W&B (the run config's `report_to`), or None."""
    if not enabled or cfg.report_to == "none":
        return None
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        return lambda m, s: [writer.add_scalar(k, v, s) for k, v in m.items() if isinstance(v, (int, float))]
    import wandb

    wandb.init(project="nested-reft", dir=str(out), config=vars(cfg))
    return lambda m, s: wandb.log({k: v for k, v in m.items() if not isinstance(v, list)}, step=s)


def accumulate_run(state: dict, m: dict) -> None:
    """Add one step's metrics line to the run's running totals (kept in checkpoints, read by summary.json)."""
    state["step_time_s"] = state.get("step_time_s", 0.0) + m["step_s"]
    state["tokens_processed"] += m["tokens_processed"]
    state["tokens_generated"] += m["tokens_generated"]
    state["rollout_s"] += m["rollout_s"]
    state["skipped_updates"] += int(m["skipped_update"])
    state["consecutive_skipped"] = state.get("consecutive_skipped", 0) + 1 if m["skipped_update"] else 0
    state["rewards"].append(m["reward_mean"])
    sums = state.setdefault("offpolicy_sums", {})  # summary key: [sum over steps, steps]; JSON in checkpoints
    for metric, key in OFFPOLICY_SUMMARY.items():
        value = m.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            total = sums.setdefault(key, [0.0, 0])
            total[0] += float(value)
            total[1] += 1


def run_mean(state: dict, key: str) -> float | None:
    """Mean over steps of an `offpolicy_sums` entry (None when no step logged it, e.g. an old checkpoint)."""
    total, steps = state.get("offpolicy_sums", {}).get(key, (0.0, 0))
    return total / steps if steps else None


#: Per-step off-policy metrics whose run mean (over the steps that logged it) goes to summary.json.
OFFPOLICY_SUMMARY = {
    "rollout_corr/kl": "offpolicy_kl_k1_mean",
    "rollout_corr/k3_kl": "offpolicy_kl_k3_mean",
    "rollout_corr/kl_old_behavior": "offpolicy_kl_old_behavior_mean",
    "rollout_corr/chi2_token": "offpolicy_chi2_token_mean",
    "rollout_corr/chi2_seq": "offpolicy_chi2_seq_mean",
    "rollout_corr/ess_token": "offpolicy_ess_token_mean",
    "rollout_corr/ess_seq": "offpolicy_ess_seq_mean",
    "rollout_corr/ratio_outside_frac": "offpolicy_ratio_outside_frac_mean",
    "rollout_corr/max_abs_log_ratio": "offpolicy_max_abs_log_ratio_mean",
}


def run_offpolicy_means(state: dict) -> dict[str, float | None]:
    """summary.json's off-policy entries: each metric's mean over the steps that logged it."""
    return {key: run_mean(state, key) for key in OFFPOLICY_SUMMARY.values()}

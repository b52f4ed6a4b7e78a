"""The RL update of Nested-ReFT as pure tensor functions: advantages, h_m weights, GRPO loss.

Nothing here touches a model, a tokenizer or a file: tensors in, tensors and metric dicts (python
floats) out. Shapes use N = number of completions in the batch (B prompts x G generations, each
prompt's G completions contiguous) and L = padded completion length.

Pipeline of one RL step (SPEC section 2, items 7-9; paper section 2.2)::

    A = group_advantages(rewards, G)                                  # [N]
    h, m1 = importance_weights(target_lp, behavior_lp, mask, "retrace")  # [N, L], detached
    logp = token_logprobs(policy_logits, completion_ids, temperature)  # [N, L], with grad
    loss, m2 = policy_loss(logp, None, A, h, mask, loss_type="bnpo")

Choices this module makes (the trainer relies on them):

- **Advantages** follow TRL's GRPOTrainer: the group std is torch's default *unbiased* std
  (correction=1) and the denominator is ``std + 1e-4``. A group of one completion has std := 0
  (so A = 0) instead of TRL's NaN. ``scale_rewards="none"`` is Dr. GRPO (mean-centred only).
- **h_m** is computed from ``log rho = log pi_old - log eta'`` in float64 and returned in float32,
  detached. On padding (mask == 0) h is 0 for every mitigation, and whatever the padding holds
  (even NaN/-inf) is ignored. ``rho`` is exp of the log-ratio clamped from above at
  ``LOG_RATIO_MAX`` = 50 (rho <= 5.2e21): a guard against float overflow, not a variance
  reduction; ``metrics["log_ratio_clamped_frac"]`` counts how often it fires (for "retrace" it
  never changes h since min(1, rho) = 1 there). There is no lower clamp: exp underflows to 0.
- **Mitigations**: the paper's "base" (h = rho), "practical" (h = 1) and "retrace"
  (h = lam * min(1, rho)), and two beyond the paper: "tis", truncated IS, h = min(rho, C), and
  "mis", masked IS, h = rho when C_low <= rho <= C, else 0 (``cap`` = C = 2 and ``cap_low`` =
  C_low = 1/C by default). The paper's three do not read C and are unchanged by it.
- ``h_truncated_frac`` is the fraction of masked units (tokens, or sequences at sequence level)
  where Retrace's ``min(1, rho)`` is active, i.e. rho > 1. It is 0 for "base" and "practical"
  (their deviation from rho is total, or nil, by definition) and for "tis"/"mis", which have
  their own: ``h_capped_frac`` (tis's cap active, rho > C) and ``h_masked_frac`` (units mis set
  to 0); each is 0 for every other mitigation. ``rho_*`` metrics report the raw ratio for every
  mitigation, so off-policyness is visible even when "practical" ignores it.
- **Sequence level**: ``log rho_seq = sum over the sequence's masked tokens of log rho_l``; the
  mitigation is applied to rho_seq and the result is broadcast over the sequence's masked tokens.
  One definition of rho_seq serves every mitigation, and the sum is the true likelihood ratio of
  the sequence, pi_old(y) / eta'(y) (TRL 1.16's vLLM ``sequence_truncate``/``sequence_mask`` use it
  too); verl's "geometric" alternative, exp of the *mean* log-ratio, is a different, biased
  estimator and is not offered. The price: its variance grows with length (warn the user; at
  L = 256 a mean per-token log-ratio of 0.2 already hits the overflow clamp), and "mis" masks long
  sequences more often than short ones, since their summed log-ratio strays further from 0.
- **Off-policy diagnostics** (`offpolicy_sums` -> `combine_offpolicy` -> `finish_offpolicy`, or
  `offpolicy_metrics` for one batch) describe the raw ratios, whatever the mitigation: k1 and k3
  estimates of KL(eta' || pi_old) (the samples come from eta'), chi^2 and the effective sample size
  of the token and sequence weights, the fraction of token ratios outside [1/C, C] and max |log rho|.
  They are computed from additive pieces (sums, counts, one max), so N processes summing their
  pieces and finishing once report exactly what one process would for the same batch.
- **Loss**: ``per_token = -h * min(r * A, clip(r, 1-eps, 1+eps_high) * A) + beta * KL_k3`` with
  ``r = exp(logp - old_logp)``. h multiplies the clipped surrogate from outside, exactly as TRL
  applies its (vLLM) importance-sampling correction, and the KL term is *not* weighted by h
  (also as TRL). With ``old_logprobs=None`` (num_iterations == 1) old = logp.detach(), r == 1 and
  the gradient is ``h * A * grad log pi`` per token.
- **Aggregation** (TRL's definitions): "bnpo" = masked sum / max(1, number of masked tokens);
  "grpo" = mean over sequences of (masked sum / max(1, sequence length)) -- an all-padding
  sequence still counts in the mean, with loss 0; "dr_grpo" = masked sum / (N * max_new_tokens).
  TRL additionally divides by gradient-accumulation steps in its trainer; that is the caller's job.
- **Clip metrics** follow TRL: a token counts as clipped low when r < 1-eps and A < 0, high when
  r > 1+eps_high and A > 0 (the regions where the clip removes the gradient).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "SCALE_REWARDS",
    "MITIGATIONS",
    "IS_LEVELS",
    "LOSS_TYPES",
    "LOG_RATIO_MAX",
    "ADV_EPS",
    "group_advantages",
    "group_reward_stats",
    "importance_weights",
    "OffPolicySums",
    "offpolicy_sums",
    "combine_offpolicy",
    "finish_offpolicy",
    "offpolicy_metrics",
    "policy_loss",
    "token_logprobs",
]

SCALE_REWARDS = ("group", "none")
#: The paper's three mitigations, then two beyond it: truncated (tis) and masked (mis) importance sampling.
MITIGATIONS = ("base", "practical", "retrace", "tis", "mis")
IS_LEVELS = ("token", "sequence")
LOSS_TYPES = ("bnpo", "grpo", "dr_grpo")

#: Upper clamp on log rho before exp: only an overflow guard (exp(50) ~ 5.2e21).
LOG_RATIO_MAX = 50.0
#: Added to the group std in the advantage denominator (TRL's constant).
ADV_EPS = 1e-4


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not a multiple of num_generations ({num_generations})"
        )
    return rewards.detach().to(torch.float64).view(-1, num_generations)  # [B, G]


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> torch.Tensor:
    """GRPO group-normalised advantages, one per completion.

    rewards: [B*G], each prompt's G completions contiguous. Returns float32 [B*G]:
    ``A = (r - mean_group) / (std_group + 1e-4)`` for ``scale_rewards="group"`` (std is torch's
    default unbiased std, correction=1, as TRL's GRPOTrainer; std := 0 when G == 1), and
    ``A = r - mean_group`` for ``"none"`` (Dr. GRPO). Identical rewards in a group give A = 0.
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    grouped = _grouped(rewards, num_generations)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale_rewards == "group":
        if num_generations > 1:
            std = grouped.std(dim=1, keepdim=True)  # [B, 1], unbiased
        else:
            std = torch.zeros_like(centred)
        centred = centred / (std + ADV_EPS)
    return centred.reshape(-1).to(torch.float32)  # [B*G]


def group_reward_stats(rewards: torch.Tensor, num_generations: int) -> dict[str, float]:
    """Reward metrics for logging: mean, mean within-group std, fraction of groups with zero std.

    Groups whose rewards are all equal contribute no gradient (A = 0); ``frac_reward_zero_std`` is
    TRL's metric of the same name.
    """
    grouped = _grouped(rewards, num_generations)  # [B, G]
    if num_generations > 1:
        std = grouped.std(dim=1)  # [B]
    else:
        std = torch.zeros(grouped.shape[0], dtype=grouped.dtype, device=grouped.device)
    return {
        "reward_mean": float(grouped.mean()),
        "reward_std": float(std.mean()),
        "frac_reward_zero_std": float((std == 0).to(torch.float64).mean()),
    }


def _apply_mitigation(log_rho: torch.Tensor, mitigation: str, lam: float, cap: float = 2.0,
                      cap_low: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """rho (overflow-guarded) and h from a float64 log-ratio tensor of any shape."""
    rho = torch.exp(log_rho.clamp(max=LOG_RATIO_MAX))
    if mitigation == "base":
        h = rho
    elif mitigation == "practical":
        h = torch.ones_like(rho)
    elif mitigation == "retrace":
        h = lam * torch.clamp(rho, max=1.0)
    elif mitigation == "tis":
        h = torch.clamp(rho, max=cap)
    else:  # mis
        h = torch.where((rho >= cap_low) & (rho <= cap), rho, torch.zeros_like(rho))
    return rho, h


def _check_caps(cap, cap_low, mitigation: str) -> float:
    """Validate C and C_low (ValueError); returns C_low (1/C when None)."""
    for name, value in (("cap", cap), ("cap_low", cap_low)):
        if value is None and name == "cap_low":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if cap_low is not None and cap_low > cap:
        raise ValueError(f"cap_low={cap_low!r} must be <= cap={cap!r}")
    low = 1.0 / cap if cap_low is None else float(cap_low)
    if mitigation == "mis" and low > cap:
        raise ValueError(f"mis with cap={cap!r} < 1 and cap_low=None (1/cap = {low:g}) keeps no ratio; give cap_low")
    return low


def _masked_log_ratio(target_logprobs, behavior_logprobs, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [N, L] bool, log rho [N, L] float64, detached, 0 on padding) after checking the shapes."""
    if target_logprobs.shape != behavior_logprobs.shape or target_logprobs.shape != mask.shape:
        raise ValueError(
            "target_logprobs, behavior_logprobs and mask must have the same shape, got "
            f"{tuple(target_logprobs.shape)}, {tuple(behavior_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if target_logprobs.dim() != 2:
        raise ValueError(f"log-probs must be 2-D [N, L], got shape {tuple(target_logprobs.shape)}")
    valid = mask.detach().bool()
    log_ratio = target_logprobs.detach().to(torch.float64) - behavior_logprobs.detach().to(torch.float64)
    return valid, torch.where(valid, log_ratio, torch.zeros_like(log_ratio))


def importance_weights(
    target_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mitigation: str,
    lam: float = 1.0,
    level: str = "token",
    *,
    cap: float = 2.0,
    cap_low: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The detached h_m weights of Nested-ReFT (paper section 2.2; SPEC 2.8).

    target_logprobs:   [N, L] log pi_old(y_l | s_l), the full-depth policy at rollout time.
    behavior_logprobs: [N, L] log eta'(y_l | s_l), the nested model that sampled y.
    mask:              [N, L] 1 (or True) on completion tokens, 0 on padding.
    Both log-probs must use the same temperature scaling.

    ``rho = exp(target - behavior)``; "base": h = rho, "practical": h = 1, "retrace":
    h = lam * min(1, rho), "tis": h = min(rho, cap), "mis": h = rho if cap_low <= rho <= cap
    else 0 (cap_low None: 1 / cap). level "token": one rho per token; "sequence": rho_seq =
    exp(sum of the sequence's masked log-ratios), broadcast over its masked tokens.

    Returns ``(h, metrics)``: h float32 [N, L], no grad, 0 on padding. metrics (python floats,
    over masked tokens at token level, over sequences with >= 1 masked token at sequence level):
    h_mean, h_min, h_max, h_truncated_frac (retrace's min active, rho > 1), h_capped_frac (tis's
    cap active, rho > cap), h_masked_frac (mis set h to 0), rho_mean, rho_max, log_ratio_mean,
    log_ratio_clamped_frac (overflow guard fired), num_units.
    See the module docstring for the clamp.
    """
    _check_choice("mitigation", mitigation, MITIGATIONS)
    _check_choice("level", level, IS_LEVELS)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    low = _check_caps(cap, cap_low, mitigation)
    with torch.no_grad():
        valid, log_ratio = _masked_log_ratio(target_logprobs, behavior_logprobs, mask)  # [N, L] each

        if level == "token":
            unit_log_ratio = log_ratio[valid]  # [T] masked tokens
            rho_units, h_units = _apply_mitigation(unit_log_ratio, mitigation, lam, cap, low)
            h = torch.zeros_like(log_ratio)  # [N, L]
            h[valid] = h_units
        else:
            seq_log_ratio = log_ratio.sum(dim=1)  # [N]
            has_tokens = valid.any(dim=1)  # [N]
            rho_seq, h_seq = _apply_mitigation(seq_log_ratio, mitigation, lam, cap, low)  # [N]
            h = torch.where(valid, h_seq.unsqueeze(1), torch.zeros_like(log_ratio))  # [N, L]
            unit_log_ratio = seq_log_ratio[has_tokens]
            rho_units, h_units = rho_seq[has_tokens], h_seq[has_tokens]

        n = unit_log_ratio.numel()
        if n == 0:
            metrics = dict.fromkeys(
                ("h_mean", "h_min", "h_max", "h_truncated_frac", "h_capped_frac", "h_masked_frac",
                 "rho_mean", "rho_max", "log_ratio_mean", "log_ratio_clamped_frac"),
                0.0,
            )
        else:
            none = torch.zeros_like(rho_units, dtype=torch.bool)  # [units]
            truncated = (rho_units > 1.0) if mitigation == "retrace" else none
            capped = (rho_units > cap) if mitigation == "tis" else none
            masked = ((rho_units < low) | (rho_units > cap)) if mitigation == "mis" else none
            metrics = {
                "h_mean": float(h_units.mean()),
                "h_min": float(h_units.min()),
                "h_max": float(h_units.max()),
                "h_truncated_frac": float(truncated.to(torch.float64).mean()),
                "h_capped_frac": float(capped.to(torch.float64).mean()),
                "h_masked_frac": float(masked.to(torch.float64).mean()),
                "rho_mean": float(rho_units.mean()),
                "rho_max": float(rho_units.max()),
                "log_ratio_mean": float(unit_log_ratio.mean()),
                "log_ratio_clamped_frac": float((unit_log_ratio > LOG_RATIO_MAX).to(torch.float64).mean()),
            }
        metrics["num_units"] = float(n)
    return h.to(torch.float32), metrics


class OffPolicySums(NamedTuple):
    """The additive pieces of the off-policy diagnostics of a batch (python floats): sums over masked
    tokens / over sequences with >= 1 masked token, and one max. Pieces of disjoint parts of a batch
    combine (`combine_offpolicy`: fieldwise sum, max for `max_abs_log_ratio`) into the whole batch's."""

    tokens: float  # T, masked tokens
    seqs: float  # S, sequences with >= 1 masked token
    neg_log_ratio: float  # sum of log eta' - log pi_old (k1)
    k3: float  # sum of rho - 1 - log rho
    rho: float  # sum of token rho
    rho_sq: float  # sum of token rho^2
    rho_seq: float  # sum of rho_seq
    rho_seq_sq: float  # sum of rho_seq^2
    outside: float  # tokens with rho outside [1/cap, cap]
    abs_log_ratio: float  # sum of |log rho|
    rho_log_rho: float  # sum of rho * log rho (KL(pi_old || eta'), importance-weighted)
    max_abs_log_ratio: float  # max of |log rho| (0 with no tokens)


def offpolicy_sums(target_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
                   cap: float = 2.0) -> OffPolicySums:
    """OffPolicySums of one batch: target = log pi_old, behavior = log eta' (the sampler), all [N, L].

    log rho = target - behavior in float64, padding ignored (whatever it holds); rho and rho_seq =
    exp(sum of a sequence's masked log rho) are exp of the log-ratio clamped at LOG_RATIO_MAX (the
    k3 and chi^2 pieces use the clamped log-ratio, k1 and |log rho| the raw one).
    """
    _check_caps(cap, None, "tis")
    with torch.no_grad():
        valid, log_ratio = _masked_log_ratio(target_logprobs, behavior_logprobs, mask)  # [N, L] each
        tok = log_ratio[valid]  # [T]
        tok_c = tok.clamp(max=LOG_RATIO_MAX)  # [T]
        rho = torch.exp(tok_c)  # [T]
        seq = log_ratio.sum(dim=1)[valid.any(dim=1)]  # [S]
        rho_seq = torch.exp(seq.clamp(max=LOG_RATIO_MAX))  # [S]
        return OffPolicySums(
            tokens=float(tok.numel()),
            seqs=float(seq.numel()),
            neg_log_ratio=float(-tok.sum()),
            k3=float((rho - 1.0 - tok_c).sum()),
            rho=float(rho.sum()),
            rho_sq=float((rho * rho).sum()),
            rho_seq=float(rho_seq.sum()),
            rho_seq_sq=float((rho_seq * rho_seq).sum()),
            outside=float(((rho < 1.0 / cap) | (rho > cap)).sum()),
            abs_log_ratio=float(tok.abs().sum()),
            rho_log_rho=float((rho * tok_c).sum()),
            max_abs_log_ratio=float(tok.abs().max()) if tok.numel() else 0.0,
        )


def combine_offpolicy(parts) -> OffPolicySums:
    """The OffPolicySums of the union of disjoint parts (an iterable of OffPolicySums or of rows of
    their fields in order): every field summed, `max_abs_log_ratio` maxed."""
    rows = [OffPolicySums(*map(float, p)) for p in parts]
    if not rows:
        raise ValueError("combine_offpolicy needs at least one part")
    summed = [sum(col) for col in zip(*rows)]
    return OffPolicySums(*summed[:-1], max(r.max_abs_log_ratio for r in rows))


def finish_offpolicy(s: OffPolicySums) -> dict[str, float]:
    """The off-policy metrics from (globally summed) pieces; every metric is 0 with no masked token.

    rollout_corr/kl = k1 = mean(log eta' - log pi_old) and rollout_corr/k3_kl = mean(rho - 1 - log rho),
    both estimating KL(eta' || pi_old) from eta''s samples (k1 can be negative, k3 >= 0);
    rollout_corr/kl_old_behavior = mean(rho log rho) estimates the other direction, KL(pi_old || eta')
    (importance-weighted: E_eta'[rho log rho]; heavy-tailed when rho is); chi2_token = mean(rho^2) - 1,
    chi2_seq = mean(rho_seq^2) - 1 (sample estimates of E[rho^2] - 1 >= 0 that can come out negative
    on a finite batch); ess_token / ess_seq =
    (sum w)^2 / (n sum w^2) of w = rho / rho_seq (in (0, 1]; 0 if every weight underflowed);
    ratio_outside_frac = fraction of token rho outside [1/cap, cap]; max_abs_log_ratio = max |log rho|;
    TRL's sampling/sampling_logp_difference/{mean,max} = mean and max of |log rho|.
    """
    t, n = max(s.tokens, 1.0), max(s.seqs, 1.0)

    def ess(total: float, total_sq: float, count: float) -> float:
        return total * total / (count * total_sq) if count > 0 and total_sq > 0 else 0.0

    any_tok, any_seq = s.tokens > 0, s.seqs > 0
    return {
        "rollout_corr/kl": s.neg_log_ratio / t,
        "rollout_corr/k3_kl": s.k3 / t,
        "rollout_corr/kl_old_behavior": s.rho_log_rho / t,
        "rollout_corr/chi2_token": s.rho_sq / t - 1.0 if any_tok else 0.0,
        "rollout_corr/chi2_seq": s.rho_seq_sq / n - 1.0 if any_seq else 0.0,
        "rollout_corr/ess_token": ess(s.rho, s.rho_sq, s.tokens),
        "rollout_corr/ess_seq": ess(s.rho_seq, s.rho_seq_sq, s.seqs),
        "rollout_corr/ratio_outside_frac": s.outside / t,
        "rollout_corr/max_abs_log_ratio": s.max_abs_log_ratio,
        "sampling/sampling_logp_difference/mean": s.abs_log_ratio / t,
        "sampling/sampling_logp_difference/max": s.max_abs_log_ratio,
    }


def offpolicy_metrics(target_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
                      cap: float = 2.0) -> dict[str, float]:
    """Off-policy diagnostics of one batch ([N, L] each, target = log pi_old, behavior = log eta'):
    `finish_offpolicy(offpolicy_sums(...))`. For several processes, gather the sums, combine them
    with `combine_offpolicy` and finish once."""
    return finish_offpolicy(offpolicy_sums(target_logprobs, behavior_logprobs, mask, cap))


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    h: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "bnpo",
    max_new_tokens: int | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """h-weighted GRPO (PPO-clipped) loss, aggregated as TRL's GRPOTrainer does.

    logprobs:     [N, L] log pi_theta of the completion tokens (with grad).
    old_logprobs: [N, L] log pi_old (detached), or None for num_iterations == 1 (= logprobs.detach()).
    advantages:   [N] (or [N, 1]).
    h:            [N, L] detached importance weights from `importance_weights` (or [N, 1]).
    mask:         [N, L] 1 on completion tokens.
    ref_logprobs: [N, L] frozen-reference log-probs, required when beta > 0.

    ``per_token = -h * min(r*A, clip(r, 1-epsilon, 1+epsilon_high)*A) + beta * k3``, r = exp(logp
    - old), k3 = exp(ref - logp) - (ref - logp) - 1. epsilon_high defaults to epsilon.
    loss_type "bnpo" | "grpo" | "dr_grpo" (needs max_new_tokens); see the module docstring.

    Returns ``(loss, metrics)``: a scalar float32 tensor; metrics clip_frac, clip_frac_low,
    clip_frac_high (masked-token fractions, TRL's region definitions), ratio_mean, and kl
    (masked-token mean of k3) when beta > 0.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if epsilon_high is None:
        epsilon_high = epsilon
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if loss_type == "dr_grpo" and (
        max_new_tokens is None or isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"loss_type 'dr_grpo' needs max_new_tokens as a positive int, got {max_new_tokens!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [N, L], got shape {tuple(logprobs.shape)}")
    n_seq, length = logprobs.shape
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if old_logprobs is not None and old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs shape {tuple(old_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if ref_logprobs is not None and beta > 0 and ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if advantages.numel() != n_seq:
        raise ValueError(f"advantages must have one value per sequence ({n_seq}), got shape {tuple(advantages.shape)}")
    if h.shape not in (logprobs.shape, (n_seq, 1)):
        raise ValueError(f"h must have shape {tuple(logprobs.shape)} or ({n_seq}, 1), got {tuple(h.shape)}")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    valid = mask.detach().bool()  # [N, L]
    fmask = valid.to(dtype)  # [N, L]

    def clean(x: torch.Tensor) -> torch.Tensor:
        # Zero the padding before any arithmetic, so NaN/inf there cannot reach the loss or the
        # gradients (where() sends a zero gradient, not NaN, to the unselected branch).
        return torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    logp = clean(logprobs)  # [N, L]
    old = logp.detach() if old_logprobs is None else clean(old_logprobs.detach())  # [N, L]
    adv = advantages.detach().to(dtype).reshape(n_seq, 1)  # [N, 1]
    weights = clean(h.detach())  # [N, L] ([N, 1] broadcasts), 0 on padding

    ratio = torch.exp(logp - old)  # [N, L]
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)  # [N, L]
    surrogate = torch.min(ratio * adv, clipped * adv)  # [N, L]
    per_token_loss = -weights * surrogate  # [N, L]
    if beta > 0:
        ref = clean(ref_logprobs.detach())  # [N, L]
        delta = ref - logp
        per_token_kl = torch.exp(delta) - delta - 1.0  # [N, L], k3 estimator
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = torch.where(valid, per_token_loss, torch.zeros_like(per_token_loss))

    if loss_type == "bnpo":
        loss = per_token_loss.sum() / fmask.sum().clamp(min=1.0)
    elif loss_type == "grpo":
        loss = (per_token_loss.sum(dim=1) / fmask.sum(dim=1).clamp(min=1.0)).mean()
    else:  # dr_grpo
        loss = per_token_loss.sum() / (n_seq * max_new_tokens)

    with torch.no_grad():
        count = fmask.sum().clamp(min=1.0)
        is_low = (ratio < 1.0 - epsilon) & (adv < 0) & valid
        is_high = (ratio > 1.0 + epsilon_high) & (adv > 0) & valid
        metrics = {
            "clip_frac_low": float(is_low.sum() / count),
            "clip_frac_high": float(is_high.sum() / count),
            "clip_frac": float((is_low | is_high).sum() / count),
            "ratio_mean": float(torch.where(valid, ratio, torch.zeros_like(ratio)).sum() / count),
        }
        if beta > 0:
            metrics["kl"] = float(torch.where(valid, per_token_kl, torch.zeros_like(per_token_kl)).sum() / count)
    return loss, metrics


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   banned: torch.Tensor | None = None, banned_until: int = 0, entropy: bool = False):
    """log softmax(logits / T) gathered at labels: [N, L, V], [N, L] -> float32 [N, L]; with
    `entropy=True` also the entropy [N, L] of each position's distribution (no grad), as
    ``(logprobs, entropy)``.

    The ids in `banned` [K] get probability 0 at positions t < banned_until, as the sampler does with
    EOS before `min_new_tokens`: the scored distribution is then the one sampled from, so a policy
    scoring its own samples gets exactly the sampler's log-probs (importance weights 1 when nothing is
    skipped) instead of the unsuppressed ones, which differ by log(1 - p(EOS)).

    Works one sequence at a time (a [L, V] float32 copy at most, never a full [N, L, V]
    log_softmax), with the softmax in float32 even for bf16/fp16 logits. Differentiable. labels
    must be valid ids in [0, V) everywhere, padding included (use the pad id, not -100); the
    caller must align logits and labels (logits at position t predict token t+1 of the input).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [N, L, V] and labels [N, L], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows, entropies = [], []
    for row_logits, row_labels in zip(logits, labels):  # [L, V], [L]
        row = row_logits.to(dtype)
        if temperature != 1.0:
            row = row / temperature
        if banned is not None and banned.numel() and banned_until > 0:
            row = torch.cat([row[:banned_until].index_fill(-1, banned.to(row.device), float("-inf")), row[banned_until:]])
        selected = row.gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1)  # [L]
        norm = torch.logsumexp(row, dim=-1)  # [L]
        rows.append(selected - norm)  # [L]
        if entropy:
            with torch.no_grad():
                probs = (row - norm.unsqueeze(-1)).exp()  # [L, V]
                entropies.append(norm - (probs * row.nan_to_num(neginf=0.0)).sum(-1))  # H = logZ - E[logit]
    out = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=dtype)
    if not entropy:
        return out
    return out, torch.stack(entropies) if entropies else torch.zeros_like(out)

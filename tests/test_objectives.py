"""Tests for nested_reft.objectives: advantages, h_m importance weights, GRPO loss, token log-probs."""

import math

import pytest
import torch

from nested_reft.objectives import (
    LOG_RATIO_MAX,
    OffPolicySums,
    combine_offpolicy,
    finish_offpolicy,
    group_advantages,
    group_reward_stats,
    importance_weights,
    offpolicy_metrics,
    offpolicy_sums,
    policy_loss,
    token_logprobs,
)

MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0],
    ],
    dtype=torch.float32,
)  # uneven completion lengths 5, 3, 1, 4


def _rand_logprobs(gen, shape, scale=1.0):
    return -torch.rand(shape, generator=gen, dtype=torch.float64) * 3.0 * scale


# ---------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, num_generations=4)
    assert adv.dtype == torch.float32 and adv.shape == (12,)
    std1 = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std1 + 1e-4)
    expected1 = torch.tensor([a, -a, -a, a])
    assert torch.allclose(adv[:4], expected1, atol=1e-6)
    # identical rewards: all zeros
    assert torch.equal(adv[4:8], torch.zeros(4))
    # [0, 0, 0, 1]: mean .25, unbiased std = sqrt((3*.0625 + .5625)/3) = 0.5
    expected3 = torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (0.5 + 1e-4)
    assert torch.allclose(adv[8:], expected3, atol=1e-6)
    # each group sums to zero
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)


def test_group_advantages_none_is_dr_grpo():
    rewards = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1])  # ints accepted
    adv = group_advantages(rewards, 4, scale_rewards="none")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]))


def test_group_advantages_single_generation_is_zero():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1)
    assert torch.equal(adv, torch.zeros(3))


def test_group_reward_stats():
    stats = group_reward_stats(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert stats["reward_mean"] == pytest.approx(0.75)
    assert stats["frac_reward_zero_std"] == pytest.approx(0.5)
    assert stats["reward_std"] == pytest.approx(math.sqrt(0.5) / 2)


# ---------------------------------------------------------------------------------------------
# importance weights


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mitigation", ["base", "practical", "retrace"])
def test_weights_are_one_when_nothing_is_skipped(mitigation, level):
    gen = torch.Generator().manual_seed(0)
    lp = _rand_logprobs(gen, MASK.shape).float()
    h, metrics = importance_weights(lp, lp.clone(), MASK, mitigation, lam=1.0, level=level)
    assert h.dtype == torch.float32 and not h.requires_grad
    assert torch.equal(h[MASK.bool()], torch.ones(int(MASK.sum())))
    assert torch.equal(h[~MASK.bool()], torch.zeros(int((1 - MASK).sum())))
    assert metrics["h_mean"] == metrics["h_min"] == metrics["h_max"] == 1.0
    assert metrics["log_ratio_mean"] == 0.0 and metrics["h_truncated_frac"] == 0.0
    assert metrics["num_units"] == (MASK.sum().item() if level == "token" else 4.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_retrace_never_exceeds_lambda(lam, level):
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 2.0
    behavior = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 2.0
    mask = (torch.rand(64, 16, generator=gen) < 0.8).float()
    h, metrics = importance_weights(target, behavior, mask, "retrace", lam=lam, level=level)
    assert (h <= lam).all() and (h >= 0).all()
    assert metrics["h_max"] <= lam
    base, _ = importance_weights(target, behavior, mask, "base", level=level)
    expected = lam * torch.clamp(base, max=1.0)
    assert torch.allclose(h, expected, rtol=1e-6)
    # truncated fraction = fraction of units with rho > 1
    if level == "token":
        assert metrics["h_truncated_frac"] == pytest.approx(((base > 1) & mask.bool()).sum().item() / mask.sum().item())
    assert 0.0 < metrics["h_truncated_frac"] < 1.0


def test_base_and_practical_token_values():
    target = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    behavior = torch.log(torch.tensor([[0.25, 0.4, 0.9]]))
    mask = torch.ones(1, 3)
    h, metrics = importance_weights(target, behavior, mask, "base")
    assert torch.allclose(h, torch.tensor([[2.0, 0.5, 1.0]]), atol=1e-6)
    assert metrics["h_max"] == pytest.approx(2.0) and metrics["h_min"] == pytest.approx(0.5)
    assert metrics["h_truncated_frac"] == 0.0
    assert metrics["log_ratio_mean"] == pytest.approx((math.log(2) + math.log(0.5)) / 3, abs=1e-6)
    h, metrics = importance_weights(target, behavior, mask, "retrace", lam=0.5)
    assert torch.allclose(h, torch.tensor([[0.5, 0.25, 0.5]]), atol=1e-6)
    assert metrics["h_truncated_frac"] == pytest.approx(1 / 3)
    h, metrics = importance_weights(target, behavior, mask, "practical")
    assert torch.equal(h, torch.ones(1, 3))
    assert metrics["rho_max"] == pytest.approx(2.0)  # raw ratio still reported


def test_sequence_weights_are_product_of_token_rhos():
    gen = torch.Generator().manual_seed(2)
    target = _rand_logprobs(gen, MASK.shape, 0.3)
    behavior = _rand_logprobs(gen, MASK.shape, 0.3)
    tok, _ = importance_weights(target, behavior, MASK, "base", level="token")
    seq, metrics = importance_weights(target, behavior, MASK, "base", level="sequence")
    for i in range(MASK.shape[0]):
        n = int(MASK[i].sum())
        product = torch.prod(tok[i, :n].double())
        assert torch.allclose(seq[i, :n].double(), product.expand(n), rtol=1e-5)
        assert torch.all(seq[i, n:] == 0)
    seq_log = ((target - behavior) * MASK).sum(1)
    assert metrics["log_ratio_mean"] == pytest.approx(seq_log.mean().item())
    # retrace at sequence level truncates the product
    ret, _ = importance_weights(target, behavior, MASK, "retrace", lam=1.0, level="sequence")
    assert torch.allclose(ret, torch.clamp(seq, max=1.0))


def test_overflow_guard_and_padding_garbage():
    target = torch.tensor([[0.0, 0.0, 0.0], [-1.0, -2.0, 0.0]])
    behavior = torch.tensor([[-200.0, -1.0, float("nan")], [-1.0, -2.0, float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    h, metrics = importance_weights(target, behavior, mask, "base")
    assert torch.isfinite(h).all()
    assert h[0, 0].item() == pytest.approx(math.exp(LOG_RATIO_MAX), rel=1e-5)
    assert metrics["log_ratio_clamped_frac"] == pytest.approx(0.25)
    assert h[0, 2] == 0 and h[1, 2] == 0
    h, metrics = importance_weights(target, behavior, mask, "retrace")
    assert h[0, 0] == 1.0 and torch.isfinite(h).all()
    h, _ = importance_weights(target, behavior, mask, "base", level="sequence")
    assert torch.isfinite(h).all()


# tis / mis by hand: token ratios (rows, padding marked x)
#   row 0: 3.0, 0.25, 1.5      row 1: 0.8, x (NaN behind the mask), x
TIS_RHO = [[3.0, 0.25, 1.5], [0.8, 1.0, 1.0]]
TIS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


def _tis_inputs():
    behavior = torch.log(torch.tensor([[0.1, 0.8, 0.2], [0.5, 0.3, 0.3]], dtype=torch.float64))
    target = behavior + torch.log(torch.tensor(TIS_RHO, dtype=torch.float64))
    behavior[1, 1:] = float("nan")  # padding garbage must not matter
    return target, behavior


def test_tis_and_mis_token_level_by_hand():
    target, behavior = _tis_inputs()
    h, m = importance_weights(target, behavior, TIS_MASK, "tis")  # C = 2
    assert torch.allclose(h, torch.tensor([[2.0, 0.25, 1.5], [0.8, 0.0, 0.0]]), atol=1e-6)
    assert m["h_capped_frac"] == pytest.approx(1 / 4) and m["h_masked_frac"] == 0.0 and m["h_truncated_frac"] == 0.0
    assert m["h_mean"] == pytest.approx((2.0 + 0.25 + 1.5 + 0.8) / 4)
    h, m = importance_weights(target, behavior, TIS_MASK, "tis", cap=1.2)
    assert torch.allclose(h, torch.tensor([[1.2, 0.25, 1.2], [0.8, 0.0, 0.0]]), atol=1e-6)
    assert m["h_capped_frac"] == pytest.approx(2 / 4)
    h, m = importance_weights(target, behavior, TIS_MASK, "mis")  # keep 0.5 <= rho <= 2
    assert torch.allclose(h, torch.tensor([[0.0, 0.0, 1.5], [0.8, 0.0, 0.0]]), atol=1e-6)
    assert m["h_masked_frac"] == pytest.approx(2 / 4) and m["h_capped_frac"] == 0.0
    assert m["h_min"] == 0.0 and m["h_max"] == pytest.approx(1.5)
    h, m = importance_weights(target, behavior, TIS_MASK, "mis", cap=4.0, cap_low=0.9)  # keep [0.9, 4]
    assert torch.allclose(h, torch.tensor([[3.0, 0.0, 1.5], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert m["h_masked_frac"] == pytest.approx(2 / 4)
    for mitigation in ("base", "practical", "retrace"):  # the new metrics are 0 for the paper's three
        _, m = importance_weights(target, behavior, TIS_MASK, mitigation)
        assert m["h_capped_frac"] == 0.0 and m["h_masked_frac"] == 0.0


def test_tis_and_mis_sequence_level_by_hand():
    """rho_seq = product of the masked token ratios: row 0 3 * 0.25 * 1.5 = 1.125, row 1 0.8; with a
    third row 2 * 1.5 = 3.0 (summed log-ratio log 3, outside [log 0.5, log 2]) and a padding row."""
    target, behavior = _tis_inputs()
    extra_b = torch.log(torch.tensor([[0.4, 0.4, 0.4], [0.5, 0.5, 0.5]], dtype=torch.float64))
    extra_t = extra_b + torch.log(torch.tensor([[2.0, 1.5, 7.0], [9.0, 9.0, 9.0]], dtype=torch.float64))
    target, behavior = torch.cat([target, extra_t]), torch.cat([behavior, extra_b])
    mask = torch.cat([TIS_MASK, torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)])
    h, m = importance_weights(target, behavior, mask, "tis", level="sequence")
    expected = torch.tensor([[1.125] * 3, [0.8, 0, 0], [2.0, 2.0, 0], [0, 0, 0]])
    assert torch.allclose(h, expected, atol=1e-6)
    assert m["num_units"] == 3.0 and m["h_capped_frac"] == pytest.approx(1 / 3)
    h, m = importance_weights(target, behavior, mask, "mis", level="sequence")
    expected = torch.tensor([[1.125] * 3, [0.8, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert torch.allclose(h, expected, atol=1e-6)
    assert m["h_masked_frac"] == pytest.approx(1 / 3) and m["h_mean"] == pytest.approx((1.125 + 0.8) / 3)
    h, _ = importance_weights(target, behavior, mask, "mis", level="sequence", cap=3.5, cap_low=0.85)
    assert torch.allclose(h, torch.tensor([[1.125] * 3, [0, 0, 0], [3.0, 3.0, 0], [0, 0, 0]]), atol=1e-6)


def test_caps_are_validated():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    for cap in (0, 0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="cap must be a finite number > 0"):
            importance_weights(x, x, m, "tis", cap=cap)
    for low in (0.0, float("nan")):
        with pytest.raises(ValueError, match="cap_low must be a finite number > 0"):
            importance_weights(x, x, m, "mis", cap_low=low)
    with pytest.raises(ValueError, match="cap_low=3.0 must be <= cap=2.0"):
        importance_weights(x, x, m, "mis", cap=2.0, cap_low=3.0)
    with pytest.raises(ValueError, match="keeps no ratio"):
        importance_weights(x, x, m, "mis", cap=0.5)
    h, _ = importance_weights(x, x, m, "tis", cap=0.5)  # tis with C < 1 is allowed
    assert torch.allclose(h, torch.full((2, 3), 0.5))


# ---------------------------------------------------------------------------------------------
# off-policy diagnostics


def _offpolicy_by_hand(target, behavior, mask, cap=2.0):
    toks, seqs = [], []
    for i in range(len(mask)):
        row = [float(target[i][t] - behavior[i][t]) for t in range(len(mask[i])) if mask[i][t]]
        toks += row
        if row:
            seqs.append(sum(row))
    rho = [math.exp(x) for x in toks]
    rseq = [math.exp(x) for x in seqs]
    n, s = len(toks), len(seqs)
    return {
        "rollout_corr/kl": -sum(toks) / n,
        "rollout_corr/k3_kl": sum(r - 1 - x for r, x in zip(rho, toks)) / n,
        "rollout_corr/kl_old_behavior": sum(r * x for r, x in zip(rho, toks)) / n,
        "rollout_corr/chi2_token": sum(r * r for r in rho) / n - 1,
        "rollout_corr/chi2_seq": sum(r * r for r in rseq) / s - 1,
        "rollout_corr/ess_token": sum(rho) ** 2 / (n * sum(r * r for r in rho)),
        "rollout_corr/ess_seq": sum(rseq) ** 2 / (s * sum(r * r for r in rseq)),
        "rollout_corr/ratio_outside_frac": sum(r < 1 / cap or r > cap for r in rho) / n,
        "rollout_corr/max_abs_log_ratio": max(abs(x) for x in toks),
        "sampling/sampling_logp_difference/mean": sum(abs(x) for x in toks) / n,
        "sampling/sampling_logp_difference/max": max(abs(x) for x in toks),
    }


def test_offpolicy_metrics_by_hand():
    target, behavior = _tis_inputs()
    got = offpolicy_metrics(target, behavior, TIS_MASK)
    want = _offpolicy_by_hand(target.tolist(), behavior.tolist(), TIS_MASK.tolist())
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # spot values: ratios 3, .25, 1.5, .8 -> outside [.5, 2]: 3 and .25; rho_seq 1.125 and .8
    assert got["rollout_corr/ratio_outside_frac"] == 0.5
    assert got["rollout_corr/ess_seq"] == pytest.approx((1.125 + 0.8) ** 2 / (2 * (1.125 ** 2 + 0.64)))
    assert got["rollout_corr/max_abs_log_ratio"] == pytest.approx(math.log(4))
    assert offpolicy_metrics(target, behavior, TIS_MASK, cap=4.0)["rollout_corr/ratio_outside_frac"] == 0.0
    assert got["rollout_corr/k3_kl"] >= 0 and got["rollout_corr/ess_token"] <= 1


def test_offpolicy_metrics_on_policy_are_trivial():
    gen = torch.Generator().manual_seed(5)
    lp = _rand_logprobs(gen, MASK.shape)
    got = offpolicy_metrics(lp, lp.clone(), MASK)
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "ratio_outside_frac", "max_abs_log_ratio"):
        assert got[f"rollout_corr/{k}"] == 0.0, k
    assert got["rollout_corr/ess_token"] == 1.0 and got["rollout_corr/ess_seq"] == 1.0
    assert got["sampling/sampling_logp_difference/max"] == 0.0


def test_offpolicy_pieces_reduce_like_the_whole_batch():
    gen = torch.Generator().manual_seed(6)
    target, behavior = _rand_logprobs(gen, MASK.shape), _rand_logprobs(gen, MASK.shape)
    whole = offpolicy_metrics(target, behavior, MASK, cap=1.5)
    parts = [offpolicy_sums(target[sl], behavior[sl], MASK[sl], cap=1.5) for sl in (slice(0, 1), slice(1, 4))]
    split = finish_offpolicy(combine_offpolicy(parts))
    for k, v in whole.items():
        assert split[k] == pytest.approx(v, rel=1e-12), k
    # rows of floats (what gather_rows gives) combine the same way
    assert finish_offpolicy(combine_offpolicy(torch.tensor([list(p) for p in parts], dtype=torch.float64))) == split
    assert combine_offpolicy(parts).max_abs_log_ratio == max(p.max_abs_log_ratio for p in parts)  # a max, not a sum
    assert isinstance(parts[0], OffPolicySums) and combine_offpolicy(parts).tokens == MASK.sum().item()
    empty = finish_offpolicy(offpolicy_sums(target, behavior, torch.zeros_like(MASK)))
    assert all(v == 0.0 for v in empty.values())


def test_offpolicy_sequence_overflow_is_guarded():
    target = torch.zeros(1, 4, dtype=torch.float64)
    behavior = torch.full((1, 4), -30.0, dtype=torch.float64)  # summed log-ratio 120 > LOG_RATIO_MAX
    got = offpolicy_metrics(target, behavior, torch.ones(1, 4))
    assert all(math.isfinite(v) for v in got.values())
    assert got["rollout_corr/chi2_seq"] == pytest.approx(math.exp(2 * LOG_RATIO_MAX) - 1)


def test_weights_are_detached():
    target = torch.randn(2, 3, requires_grad=True)
    behavior = torch.randn(2, 3, requires_grad=True)
    h, _ = importance_weights(target, behavior, torch.ones(2, 3), "base")
    assert not h.requires_grad and h.grad_fn is None


# ---------------------------------------------------------------------------------------------
# policy loss


def _reference_grpo_loss(logp, old, adv, mask, loss_type, max_new_tokens=None, eps=0.2, h=None):
    """Plain (h = 1 unless given) clipped GRPO loss, token by token, in float64."""
    n, length = mask.shape
    seq_losses, total, count = [], 0.0, 0
    for i in range(n):
        seq_total, seq_count = 0.0, 0
        for t in range(length):
            if mask[i, t] == 0:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            term = -torch.min(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)
            if h is not None:
                term = term * float(h[i, t])
            seq_total = seq_total + term
            seq_count += 1
        seq_losses.append(seq_total / max(seq_count, 1))
        total = total + seq_total
        count += seq_count
    if loss_type == "bnpo":
        return total / count
    if loss_type == "grpo":
        return sum(seq_losses) / n
    return total / (n * max_new_tokens)


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("off_policy_old", [False, True])
def test_practical_gives_plain_grpo_gradient(loss_type, off_policy_old):
    gen = torch.Generator().manual_seed(3)
    base = _rand_logprobs(gen, MASK.shape)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    old = base + 0.4 * torch.randn(MASK.shape, generator=gen, dtype=torch.float64) if off_policy_old else None
    behavior = _rand_logprobs(gen, MASK.shape)
    h, _ = importance_weights(base, behavior, MASK, "practical")

    logp = base.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, h, MASK, loss_type=loss_type, max_new_tokens=6)
    loss.backward()

    ref_logp = base.clone().requires_grad_(True)
    ref_old = base if old is None else old
    ref = _reference_grpo_loss(ref_logp, ref_old, adv, MASK, loss_type, max_new_tokens=6)
    ref.backward()
    assert torch.allclose(loss.double(), ref.double(), atol=1e-10)
    assert torch.allclose(logp.grad, ref_logp.grad, atol=1e-12)
    if not off_policy_old:
        # on-policy: d loss / d logp = -A / normaliser on masked tokens
        count = MASK.sum().item()
        if loss_type == "bnpo":
            expected = -adv[:, None] * MASK / count
        elif loss_type == "grpo":
            expected = -adv[:, None] * MASK / MASK.sum(1, keepdim=True) / 4
        else:
            expected = -adv[:, None] * MASK / (4 * 6)
        assert torch.allclose(logp.grad, expected.double(), atol=1e-12)


def test_base_gradient_on_linear_policy():
    torch.manual_seed(0)
    n, length, d, vocab = 4, 5, 3, 7
    policy = torch.nn.Linear(d, vocab, dtype=torch.float64)
    feats = torch.randn(n, length, d, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n, length))
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)

    logits = policy(feats)  # [N, L, V]
    logp = token_logprobs(logits, labels)
    target = logp.detach()
    behavior = target + 0.3 * torch.randn(n, length, dtype=torch.float64)  # nested model differs
    h, _ = importance_weights(target, behavior, MASK, "base")
    loss, _ = policy_loss(logp, None, adv, h, MASK, loss_type="bnpo")
    loss.backward()

    # explicit reference: grad = -(1/count) sum_{i,t masked} h A grad log pi(y | x)
    with torch.no_grad():
        probs = torch.softmax(policy(feats), dim=-1)  # [N, L, V]
        onehot = torch.nn.functional.one_hot(labels, vocab).double()
        dlogp_dlogits = onehot - probs  # [N, L, V]
        coef = -(h.double() * adv[:, None] * MASK.double()) / MASK.sum()  # [N, L]
        g_logits = coef[..., None] * dlogp_dlogits  # [N, L, V]
        grad_w = torch.einsum("nlv,nld->vd", g_logits, feats)
        grad_b = g_logits.sum(dim=(0, 1))
        rho = torch.exp(target - behavior)
    assert torch.allclose(h.double() * MASK, rho * MASK, rtol=1e-6)
    assert torch.allclose(policy.weight.grad, grad_w, atol=1e-6)
    assert torch.allclose(policy.bias.grad, grad_b, atol=1e-6)


def test_aggregations_hand_computed():
    logp = torch.zeros(2, 3, requires_grad=True)  # ratio == 1 everywhere
    adv = torch.tensor([1.0, -2.0])
    h = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # per-token losses: [-1, -2, -3] and [+1]
    bnpo, _ = policy_loss(logp, None, adv, h, mask, loss_type="bnpo")
    grpo, _ = policy_loss(logp, None, adv, h, mask, loss_type="grpo")
    dr, _ = policy_loss(logp, None, adv, h, mask, loss_type="dr_grpo", max_new_tokens=4)
    assert bnpo.item() == pytest.approx(-5 / 4)
    assert grpo.item() == pytest.approx((-6 / 3 + 1 / 1) / 2)
    assert dr.item() == pytest.approx(-5 / (2 * 4))
    # [N, 1] (sequence-level) h broadcasts
    loss, _ = policy_loss(logp, None, adv, torch.tensor([[2.0], [1.0]]), mask)
    assert loss.item() == pytest.approx((-2 * 3 + 2) / 4)


def test_ppo_clipping_kills_gradient_of_clipped_tokens():
    base = torch.full((2, 4), -1.0)
    old = base.clone()
    old[:, :2] -= 1.0  # ratio e ~ 2.72 > 1.2 on the first two tokens
    old[:, 2] += 1.0  # ratio 1/e ~ 0.37 < 0.8 on the third
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 4)
    h = torch.ones(2, 4)
    logp = base.clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, old, adv, h, mask, epsilon=0.2)
    loss.backward()
    g = logp.grad
    # A > 0, ratio high: clipped, no gradient; ratio low with A > 0: not clipped
    assert torch.all(g[0, :2] == 0)
    assert g[0, 2] != 0 and g[0, 3] != 0
    # A < 0, ratio low: clipped, no gradient; ratio high with A < 0: not clipped
    assert g[1, 2] == 0
    assert torch.all(g[1, :2] != 0) and g[1, 3] != 0
    assert metrics["clip_frac_high"] == pytest.approx(2 / 8)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 8)
    assert metrics["clip_frac"] == pytest.approx(3 / 8)
    # epsilon_high widens the upper clip only
    logp2 = base.clone().requires_grad_(True)
    _, metrics2 = policy_loss(logp2, old, adv, h, mask, epsilon=0.2, epsilon_high=5.0)
    assert metrics2["clip_frac_high"] == 0.0 and metrics2["clip_frac_low"] == pytest.approx(1 / 8)


def test_kl_term():
    gen = torch.Generator().manual_seed(4)
    base = _rand_logprobs(gen, MASK.shape).float()
    ref = _rand_logprobs(gen, MASK.shape).float()
    adv = torch.randn(4, generator=gen)
    h = torch.ones(MASK.shape)
    no_kl, m0 = policy_loss(base, None, adv, h, MASK)
    with_kl, m1 = policy_loss(base, None, adv, h, MASK, ref_logprobs=ref, beta=0.1)
    delta = ref - base
    k3 = ((torch.exp(delta) - delta - 1) * MASK).sum() / MASK.sum()
    assert "kl" not in m0
    assert m1["kl"] == pytest.approx(k3.item(), rel=1e-5)
    assert with_kl.item() == pytest.approx(no_kl.item() + 0.1 * k3.item(), rel=1e-5)


def test_padding_garbage_does_not_leak_into_loss():
    logp = torch.tensor([[-1.0, float("nan")], [-2.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]])
    loss, _ = policy_loss(logp, None, torch.tensor([1.0, -1.0]), torch.ones(2, 2), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert loss.item() == pytest.approx(0.0) and torch.equal(logp.grad[:, 1], torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# token log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax(temperature):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 11, generator=gen) * 4
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    out = token_logprobs(logits, labels, temperature)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    assert out.shape == (3, 6) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_token_logprobs_bf16_and_grad():
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 4, 9, generator=gen) * 3).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 9, (2, 4), generator=gen)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.detach().float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(out.detach(), expected, atol=1e-5)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# argument validation


def test_bad_arguments_raise_value_error_naming_the_value():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="'sometimes'.*'base'.*'practical'.*'retrace'"):
        importance_weights(x, x, m, "sometimes")
    with pytest.raises(ValueError, match="'batch'.*'token'.*'sequence'"):
        importance_weights(x, x, m, "base", level="batch")
    for lam in (0, 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            importance_weights(x, x, m, "retrace", lam=lam)
    with pytest.raises(ValueError, match="same shape"):
        importance_weights(x, torch.zeros(2, 4), m, "base")
    with pytest.raises(ValueError, match="'dapo'.*'bnpo'"):
        policy_loss(x, None, torch.zeros(2), m, m, loss_type="dapo")
    with pytest.raises(ValueError, match="max_new_tokens.*None"):
        policy_loss(x, None, torch.zeros(2), m, m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, None, torch.zeros(2), m, m, beta=0.1)
    with pytest.raises(ValueError, match="epsilon.*-0.1"):
        policy_loss(x, None, torch.zeros(2), m, m, epsilon=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, None, torch.zeros(3), m, m)
    with pytest.raises(ValueError, match="'batch'.*'group'.*'none'"):
        group_advantages(torch.zeros(4), 2, scale_rewards="batch")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="num_generations.*0"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="temperature.*0"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)

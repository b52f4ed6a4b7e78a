import itertools

import pytest
import torch
from scipy.stats import chisquare

from nested_reft import num_skipped, sample_skip_set, valid_layers
from nested_reft.layer_skip import (check_fixed_skip_set, check_skip_config, sample_importance_skip_set,
                                    skip_probabilities, skip_set_at)


def test_paper_table_1_counts():
    assert [num_skipped(28, x) for x in (0.05, 0.10, 0.15)] == [1, 3, 4]


@pytest.mark.parametrize("n,x,u", [(28, 0.0, 0), (10, 0.05, 1), (10, 0.15, 2), (10, 0.25, 3), (4, 0.01, 1),
                                   (28, 0.25, 7), (36, 0.125, 5), (48, 0.5, 24)])
def test_round_half_up_and_at_least_one(n, x, u):
    assert num_skipped(n, x) == u


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_bad_ratio_is_named(bad):
    with pytest.raises(ValueError, match="skip ratio"):
        num_skipped(28, bad)


def test_valid_layers_protect_borders():
    assert valid_layers(28, 1) == list(range(1, 27))
    assert valid_layers(28, 0) == list(range(28))
    assert valid_layers(6, 3) == []
    with pytest.raises(ValueError, match="border"):
        valid_layers(28, -1)


def test_too_many_skips_is_a_config_error():
    with pytest.raises(ValueError, match="valid layers"):
        check_skip_config(6, 0.5, 2)  # U=3 but |V|=2


def test_skip_set_size_border_sorted_distinct():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        s = sample_skip_set(28, 0.15, 1, g)
        assert len(s) == 4 and len(set(s)) == 4 and list(s) == sorted(s)
        assert all(1 <= i <= 26 for i in s)
    assert sample_skip_set(28, 0.0, 0, g) == ()


def test_skip_set_is_uniform_over_valid_layers():
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(28)
    draws = 6000
    for _ in range(draws):
        for i in sample_skip_set(28, 0.15, 1, g):
            counts[i] += 1
    assert counts[0] == 0 and counts[27] == 0
    valid = counts[1:27].numpy()
    assert chisquare(valid).pvalue > 0.01  # expected 6000*4/26 each
    # pairs are exchangeable too: the first index is not biased low
    assert abs(valid.mean() - draws * 4 / 26) < 1e-6


def test_skip_sets_reproducible_from_seed():
    a = [sample_skip_set(28, 0.1, 1, g) for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    b = [sample_skip_set(28, 0.1, 1, g) for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_skip_set_at_is_a_pure_function_of_seed_and_step():
    from nested_reft.layer_skip import skip_set_at

    sets = [skip_set_at(28, 0.15, 1, seed=7, step=s) for s in range(6)]
    assert sets == [skip_set_at(28, 0.15, 1, seed=7, step=s) for s in range(6)]
    assert len(set(sets)) > 1 and all(len(s) == 4 and all(1 <= i <= 26 for i in s) for s in sets)
    assert sets != [skip_set_at(28, 0.15, 1, seed=8, step=s) for s in range(6)]


# ---- skip policies ----------------------------------------------------------------------------



def test_uniform_policy_is_the_paper_draw_bit_for_bit():
    for step in range(20):
        gen = torch.Generator().manual_seed(3 * 1_000_003 + step)
        assert skip_set_at(28, 0.15, 1, 3, step, "uniform") == sample_skip_set(28, 0.15, 1, gen)
        assert skip_set_at(28, 0.15, 1, 3, step) == skip_set_at(28, 0.15, 1, 3, step, "uniform", [1.0] * 28, 0.1)


def test_skip_probabilities_fall_with_importance_and_are_scale_free():
    imp = [9.0, 0.1, 0.4, 0.2, 0.8, 9.0]
    p = skip_probabilities(imp, [1, 2, 3, 4], 0.5)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0] > p[2] > p[1] > p[3]  # order of importance 0.1 < 0.2 < 0.4 < 0.8
    assert torch.allclose(p, skip_probabilities([10 * v for v in imp], [1, 2, 3, 4], 0.5))
    assert torch.allclose(skip_probabilities([0.0] * 6, [1, 2, 3, 4], 0.5), torch.full((4,), 0.25, dtype=torch.float64))
    # manual softmax
    v = torch.tensor([0.1, 0.4, 0.2, 0.8], dtype=torch.float64)
    ref = torch.exp(-v / (v.mean() * 0.5))
    assert torch.allclose(p, ref / ref.sum())


def _successive_sampling_set_probabilities(p: list[float], u: int) -> dict[tuple[int, ...], float]:
    """Exact probability of each sorted set under u successive draws without replacement (enumeration)."""
    out: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(len(p)), u):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        key = tuple(sorted(order))
        out[key] = out.get(key, 0.0) + prob
    return out


def test_importance_draws_valid_distinct_layers_with_the_stated_frequencies():
    n, ratio, border = 7, 0.3, 1  # U = 2 of V = {1..5}
    imp = [5.0, 0.05, 0.3, 0.1, 0.6, 0.2, 5.0]
    valid = [1, 2, 3, 4, 5]
    p = skip_probabilities(imp, valid, 0.7).tolist()
    exact = _successive_sampling_set_probabilities(p, 2)  # over indices into V
    draws = 20_000
    counts = {k: 0 for k in exact}
    gen = torch.Generator().manual_seed(0)
    for _ in range(draws):
        s = sample_importance_skip_set(n, ratio, border, imp, 0.7, gen)
        assert len(s) == 2 and len(set(s)) == 2 and all(i in valid for i in s)
        counts[tuple(valid.index(i) for i in s)] += 1
    keys = sorted(exact)
    stat = chisquare([counts[k] for k in keys], [exact[k] * draws for k in keys])
    assert stat.pvalue > 1e-3, stat
    # a pure function of (seed, step, profile); another profile changes the draws
    assert [skip_set_at(n, ratio, border, 5, s, "importance", imp, 0.7) for s in range(30)] == \
           [skip_set_at(n, ratio, border, 5, s, "importance", list(imp), 0.7) for s in range(30)]
    assert [skip_set_at(n, ratio, border, 5, s, "importance", imp, 0.7) for s in range(30)] != \
           [skip_set_at(n, ratio, border, 5, s, "importance", imp[::-1], 0.7) for s in range(30)]


@pytest.mark.parametrize("layers, message", [
    ([0, 3, 9, 15], "layer 0 is not a valid layer"),
    ([3, 9, 15, 27], "layer 27 is not a valid layer"),
    ([3, 3, 9, 15], "repeats a layer"),
    ([3, 9, 15], "has 3 layers but skip_ratio=0.15 gives U=4"),
])
def test_fixed_set_is_checked(layers, message):
    with pytest.raises(ValueError, match=message):
        check_fixed_skip_set(28, 0.15, 1, layers)
    assert skip_set_at(28, 0.15, 1, 0, 7, "fixed", fixed=[22, 3, 9, 15]) == (3, 9, 15, 22)

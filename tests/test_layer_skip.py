import pytest
import torch
from scipy.stats import chisquare

from nested_reft import num_skipped, sample_skip_set, valid_layers
from nested_reft.layer_skip import check_skip_config


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

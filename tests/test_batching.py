import torch

import itertools

from nested_reft.batching import PASS_COST, loss_scale, micro_batches, packed_groups
from nested_reft.rollout import Rollout


def test_micro_batches_group_rows_by_length_and_trim_the_padding():
    lengths = [3, 1, 4, 2, 4, 1]
    prompt_lengths = [2, 3, 1, 2, 1, 1]
    n, p, length = len(lengths), 3, 5
    cmask = torch.tensor([[1] * k + [0] * (length - k) for k in lengths])
    pmask = torch.tensor([[0] * (p - k) + [1] * k for k in prompt_lengths])
    ids = torch.arange(n * length).view(n, length)
    rollout = Rollout(torch.arange(n * p).view(n, p) * pmask, pmask, ids, cmask, torch.zeros(n, length), (), 0, 0, 0.0)
    batches = micro_batches(rollout, 4, pack=False)
    assert [mb.index.tolist() for mb in batches] == [[2, 4, 0, 3], [1, 5]]  # longest first, stable
    first, second = batches
    assert first.completion_ids.shape == (4, 4) and second.completion_ids.shape == (2, 1)
    assert first.prompt_ids.shape == (4, 2) and second.prompt_ids.shape == (2, 3)
    for mb in batches:  # every real token is kept, in place
        assert torch.equal(mb.completion_ids, ids[mb.index, : mb.completion_ids.size(1)])
        assert int(mb.completion_mask.sum()) == sum(lengths[i] for i in mb.index.tolist())
        assert int(mb.prompt_mask.sum()) == sum(prompt_lengths[i] for i in mb.index.tolist())


def test_packed_micro_batches_stay_within_the_token_budget():
    torch.manual_seed(0)
    n, p, length = 64, 6, 40
    lengths = torch.randint(1, length + 1, (n,))
    cmask = (torch.arange(length)[None] < lengths[:, None]).long()
    pmask = torch.ones(n, p, dtype=torch.long)
    rollout = Rollout(torch.ones(n, p, dtype=torch.long), pmask, torch.ones(n, length, dtype=torch.long), cmask,
                      torch.zeros(n, length), (), 0, 0, 0.0)
    packed, fixed = micro_batches(rollout, 8), micro_batches(rollout, 8, pack=False)
    assert sorted(torch.cat([mb.index for mb in packed]).tolist()) == list(range(n))
    assert all(mb.completion_ids.numel() + mb.prompt_ids.numel() <= 8 * (p + length) for mb in packed)
    processed = [sum(mb.completion_ids.numel() + mb.prompt_ids.numel() for mb in b) for b in (packed, fixed)]
    assert processed[0] < processed[1]  # less padding
    assert len(packed) < 2 * len(fixed)  # without a pass per length


def _cost(groups, lengths, prompt_lengths, budget):
    return sum(len(g) * (max(prompt_lengths[r] for r in g) + max(lengths[r] for r in g)) + PASS_COST * budget
               for g in groups)


def test_packed_groups_are_the_cheapest_split_within_the_budget():
    """Against every split of the sorted rows into consecutive groups (brute force)."""
    torch.manual_seed(1)
    for trial in range(20):
        n = 8
        lengths = torch.randint(1, 30, (n,)).tolist()
        prompt_lengths = torch.randint(1, 8, (n,)).tolist()
        order = sorted(range(n), key=lambda r: -lengths[r])
        budget = 3 * (8 + 30)
        groups = packed_groups(order, lengths, prompt_lengths, budget, float("inf"))
        assert [r for g in groups for r in g] == order
        feasible = []
        for cuts in itertools.product([0, 1], repeat=n - 1):
            split, start = [], 0
            for i, c in enumerate(cuts, 1):
                if c:
                    split.append(order[start:i])
                    start = i
            split.append(order[start:])
            if all(len(g) * (max(prompt_lengths[r] for r in g) + max(lengths[r] for r in g)) <= budget
                   for g in split):
                feasible.append(_cost(split, lengths, prompt_lengths, budget))
        assert abs(_cost(groups, lengths, prompt_lengths, budget) - min(feasible)) < 1e-9


def test_packed_groups_keep_the_logits_bound_and_take_an_oversized_row_alone():
    lengths, prompt_lengths = [10, 9, 8, 2], [1, 1, 1, 1]
    groups = packed_groups([0, 1, 2, 3], lengths, prompt_lengths, budget=1000, logits_budget=20)
    assert all(len(g) * max(lengths[r] for r in g) <= 20 for g in groups)
    assert packed_groups([0], [50], [5], budget=10, logits_budget=float("inf")) == [[0]]


def test_loss_scales_of_any_split_sum_to_one():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    for split in ([2, 2], [1, 3], [4]):
        parts = mask.split(split)
        for loss_type in ("bnpo", "grpo", "dr_grpo"):
            assert sum(loss_scale(loss_type, m, float(mask.sum()), 4.0) for m in parts) == 1.0
    assert loss_scale("bnpo", mask[:1], float(mask.sum()), 4.0) == 2 / 8  # by tokens
    assert loss_scale("grpo", mask[:1], float(mask.sum()), 4.0) == 1 / 4  # by sequences

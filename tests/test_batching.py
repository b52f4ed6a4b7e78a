import torch

from nested_reft.batching import loss_scale, micro_batches
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
    assert len(packed) < len(fixed) == 8


def test_loss_scales_of_any_split_sum_to_one():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    for split in ([2, 2], [1, 3], [4]):
        parts = mask.split(split)
        for loss_type in ("bnpo", "grpo", "dr_grpo"):
            assert sum(loss_scale(loss_type, m, float(mask.sum()), 4.0) for m in parts) == 1.0
    assert loss_scale("bnpo", mask[:1], float(mask.sum()), 4.0) == 2 / 8  # by tokens
    assert loss_scale("grpo", mask[:1], float(mask.sum()), 4.0) == 1 / 4  # by sequences

"""Micro-batches of a rollout for the teacher-forced passes (pi_old, reference, the policy update).

Choices:
- Rows are grouped by completion length (longest first, a stable sort) and each micro-batch is trimmed to
  its own longest prompt and completion: a padding position costs a forward and backward like a real token.
- Packing (the default) splits the length-sorted rows into consecutive micro-batches that minimise the
  positions processed (padding included) plus a fixed cost per pass (`PASS_COST` of a full micro-batch's
  tokens: kernel calls that do not shrink with the batch), each within the tokens of `size` untrimmed rows,
  the memory a fixed micro-batch needs; an exact dynamic programme over split points. FSDP turns packing
  off, since every process must run the same number of passes.
- Which rows share a micro-batch never changes the update: every loss is a micro-batch mean scaled by
  `loss_scale` so that micro-batches sum to the full-batch loss, and every metric is a weighted sum.
"""

import math
from typing import NamedTuple

import torch

from nested_reft.rollout import Rollout


class MicroBatch(NamedTuple):
    """Rows of a rollout scored together, trimmed to their own longest prompt and completion."""
    index: torch.Tensor  # [n] the rows of the rollout
    prompt_ids: torch.Tensor  # [n, P'] left-padded
    prompt_mask: torch.Tensor  # [n, P']
    completion_ids: torch.Tensor  # [n, L']
    completion_mask: torch.Tensor  # [n, L']


#: The fixed cost of one teacher-forced pass, as a fraction of a full micro-batch's tokens. On the TRL peer
#: job (28 layers, width 128, 2 CPU threads, 2026-12-06; scripts/packing_cost.py) 1/16 and 1/8 gave the
#: fastest updates (1.407 and 1.406 s against 1.468 s at 1/32, 1.460 s at 1/4 and 1.487 s packed greedily).
PASS_COST = 1 / 16


def micro_batches(rollout: Rollout, size: int, pack: bool = True, logits_bound: bool = False) -> list[MicroBatch]:
    """The rollout's rows in micro-batches, grouped by completion length (longest first, a stable sort) and
    each trimmed to its own longest prompt and completion: a padding position costs a forward and backward
    like a real token. With `pack`, the groups are `packed_groups` (fewest positions plus per-pass cost,
    each within `size` untrimmed rows' tokens, the memory a fixed `size`-row micro-batch needs); without it
    (FSDP, where every process must run the same number of passes) each has `size` rows. Which rows share a
    micro-batch does not change the update: every loss and metric is a sum over rows (loss_scale, Means).
    `logits_bound`: a model scored through its full logits (no fused head) also keeps the completion
    positions, and so the [n, L', V] logits, within a fixed batch's."""
    lengths = rollout.completion_mask.sum(1).tolist()  # [N]
    prompt_lengths = rollout.prompt_mask.sum(1).tolist()  # [N]
    order = torch.sort(torch.tensor(lengths), descending=True, stable=True).indices.tolist()
    budget = size * (rollout.prompt_ids.size(1) + rollout.completion_ids.size(1))  # tokens of an untrimmed batch
    logits_budget = size * rollout.completion_ids.size(1) if logits_bound else math.inf
    groups = (packed_groups(order, lengths, prompt_lengths, budget, logits_budget) if pack
              else [order[i : i + size] for i in range(0, len(order), size)])
    return [trimmed(rollout, g, prompt_lengths, lengths) for g in groups]


def packed_groups(order: list[int], lengths: list[int], prompt_lengths: list[int], budget: float,
                  logits_budget: float) -> list[list[int]]:
    """`order` (rows by completion length, longest first) cut into consecutive groups that minimise the sum
    of rows x (widest prompt + longest completion) + PASS_COST x budget per group, each group within
    `budget` tokens and `logits_budget` completion positions (one row always fits): best[j] is the least
    cost of order[:j], whose last group order[i:j] is tried for every feasible i."""
    n, per_pass = len(order), PASS_COST * budget
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        prompt = 1
        for i in range(j - 1, -1, -1):  # widening the last group to order[i:j]
            rows, prompt = j - i, max(prompt, prompt_lengths[order[i]])
            completion = max(lengths[order[i]], 1)  # order[i] is the group's longest
            if rows > 1 and (rows * (prompt + completion) > budget or rows * completion > logits_budget):
                break  # only wider from here on
            cost = best[i] + rows * (prompt + completion) + per_pass
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def trimmed(rollout: Rollout, rows: list[int], prompt_lengths: list[int], lengths: list[int]) -> MicroBatch:
    """The rows `rows` of a rollout, trimmed to their own widest prompt and longest completion."""
    prompt = max(max(prompt_lengths[r] for r in rows), 1)
    length = max(max(lengths[r] for r in rows), 1)
    idx = torch.tensor(rows, device=rollout.completion_ids.device)
    return MicroBatch(idx, rollout.prompt_ids[idx, -prompt:], rollout.prompt_mask[idx, -prompt:],
                      rollout.completion_ids[idx, :length], rollout.completion_mask[idx, :length])


def micro_rows(mb: MicroBatch, values: torch.Tensor | None) -> torch.Tensor | None:
    """A micro-batch's rows of a whole-batch tensor: [B*G, L] -> [n, L'] (None stays None)."""
    return None if values is None else values[mb.index, : mb.completion_ids.size(1)]


def loss_scale(loss_type: str, mask: torch.Tensor, total_tokens: float, total_rows: float) -> float:
    """Weight of a micro-batch's mean loss so that micro-batches sum to the full-batch loss."""
    if loss_type == "bnpo":
        return float(mask.sum()) / max(total_tokens, 1.0)
    return mask.size(0) / total_rows  # grpo and dr_grpo average over sequences

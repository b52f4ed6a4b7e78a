"""Micro-batches of a rollout for the teacher-forced passes (pi_old, reference, the policy update).

Choices:
- Rows are grouped by completion length (longest first, a stable sort) and each micro-batch is trimmed to
  its own longest prompt and completion: a padding position costs a forward and backward like a real token.
- Packing (the default) fills a micro-batch while its trimmed size stays within the tokens of `size`
  untrimmed rows, the memory a fixed micro-batch needs; FSDP turns it off, since every process must run
  the same number of passes.
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


def micro_batches(rollout: Rollout, size: int, pack: bool = True, logits_bound: bool = False) -> list[MicroBatch]:
    """The rollout's rows in micro-batches, grouped by completion length (longest first, a stable sort) and
    each trimmed to its own longest prompt and completion: a padding position costs a forward and backward
    like a real token. With `pack`, a micro-batch takes rows while its trimmed size stays within `size`
    untrimmed rows' tokens (the memory a fixed `size`-row micro-batch needs), so short rows share fewer,
    larger passes; without it (FSDP, where every process must run the same number of passes) each has
    `size` rows. Which rows share a micro-batch does not change the update: every loss and metric is a
    sum over rows (loss_scale, Means). `logits_bound`: a model scored through its full logits (no fused
    head) also keeps the completion positions, and so the [n, L', V] logits, within a fixed batch's."""
    lengths = rollout.completion_mask.sum(1).tolist()  # [N]
    prompt_lengths = rollout.prompt_mask.sum(1).tolist()  # [N]
    order = torch.sort(torch.tensor(lengths), descending=True, stable=True).indices.tolist()
    budget = size * (rollout.prompt_ids.size(1) + rollout.completion_ids.size(1))  # tokens of an untrimmed batch
    logits_budget = size * rollout.completion_ids.size(1) if logits_bound else math.inf
    groups, group, width = [], [], (0, 0)
    for row in order:
        wider = (max(width[0], prompt_lengths[row], 1), max(width[1], lengths[row], 1))
        over = (len(group) + 1) * sum(wider) > budget or (len(group) + 1) * wider[1] > logits_budget
        full = len(group) == size if not pack else over
        if group and full:
            groups.append((group, width))
            group, wider = [], (max(prompt_lengths[row], 1), max(lengths[row], 1))
        group, width = group + [row], wider
    groups.append((group, width))
    device = rollout.completion_ids.device
    return [MicroBatch(idx, rollout.prompt_ids[idx, -prompt:], rollout.prompt_mask[idx, -prompt:],
                       rollout.completion_ids[idx, :length], rollout.completion_mask[idx, :length])
            for idx, (prompt, length) in ((torch.tensor(g, device=device), w) for g, w in groups)]


def micro_rows(mb: MicroBatch, values: torch.Tensor | None) -> torch.Tensor | None:
    """A micro-batch's rows of a whole-batch tensor: [B*G, L] -> [n, L'] (None stays None)."""
    return None if values is None else values[mb.index, : mb.completion_ids.size(1)]


def loss_scale(loss_type: str, mask: torch.Tensor, total_tokens: float, total_rows: float) -> float:
    """Weight of a micro-batch's mean loss so that micro-batches sum to the full-batch loss."""
    if loss_type == "bnpo":
        return float(mask.sum()) / max(total_tokens, 1.0)
    return mask.size(0) / total_rows  # grpo and dr_grpo average over sequences

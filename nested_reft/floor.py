"""The machine's floor for a rollout: the least time its arithmetic and its memory traffic allow (a roofline).

Choices:
- A rollout is its forward passes: the prefill (all rows x prompt tokens) and one decode step per new token.
  Each pass must do its arithmetic (2 x active parameters per token, plus attention's two products over
  the context) and read every active weight once and, in attention, the KV cache of every row up to the
  context. Its floor is max(arithmetic / R, bytes / B); a rollout's floor is the sum over its passes.
  Masks, norms, rotary, sampling and cache writes are left out, so 1.0 is out of reach by a margin.
- R (FLOP/s) is measured on the model's own products ([rows, k] @ [k, n] for each linear map of a layer
  and the LM head, each weighted by how often a token meets it) at 4096 rows, in the model's dtype; B (bytes/s)
  from copying a buffer larger than the caches (read + write). Each is the fastest of several timed runs:
  what this process can get on this device, so the floor is one a run could approach, not a data-sheet
  figure. Reads that stay in the last-level cache (a small model's weights) can beat B, so for such models
  the memory part is an estimate rather than a strict bound; MoE experts and sliding windows are counted
  as if every expert and position were read, which overstates their floor.
- `weights_s` alone (weight bytes / B per pass) is the memory-bandwidth floor of plain decoding; at these
  batch sizes the KV cache (`kv_s`) is often larger, and on a small CPU model the arithmetic dominates.
- A nested model skips U of the N layers: its active layers, KV cache and arithmetic are (N - U) / N of the
  decoder's; the embedding, final norm and LM head always run.
"""

import time
from typing import NamedTuple

import torch
from torch import nn

from nested_reft.nested import find_layers, text_config


class Machine(NamedTuple):
    flops_per_s: float  # R: the model's products at 4096 rows, in its dtype
    bytes_per_s: float  # B: a large copy's read + write bytes per second


class Floor(NamedTuple):
    compute_s: float  # arithmetic / R, summed over the passes
    weights_s: float  # weight bytes / B, summed over the passes
    kv_s: float  # KV-cache bytes read by attention / B, summed over the passes
    floor_s: float  # sum over passes of max(arithmetic / R, (weights + KV) / B)


class ModelShape(NamedTuple):
    layers: int  # N decoder layers
    layer_params: int  # parameters of one decoder layer (the mean over layers)
    head_params: int  # LM head parameters (vocab x hidden), read at every pass
    heads: int  # attention heads
    kv_heads: int  # key/value heads
    head_dim: int  # dimension of one head
    dtype_bytes: int  # bytes per weight and cache element


def model_shape(model) -> ModelShape:
    """The counts the floor needs, read from a Hugging Face causal LM."""
    layers = list(find_layers(model).layers)
    c = text_config(model)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    weight = next(model.parameters())
    layer_params = sum(p.numel() for layer in layers for p in layer.parameters()) // len(layers)
    return ModelShape(len(layers), layer_params, model.get_output_embeddings().weight.numel(), heads,
                      getattr(c, "num_key_value_heads", None) or heads, head_dim, weight.element_size())


def rollout_floor(shape: ModelShape, machine: Machine, rows: int, prompt_len: int, new_tokens: int,
                  skipped: int = 0) -> Floor:
    """The floor of a fixed-length rollout: `rows` rows, a `prompt_len`-token prefill, then `new_tokens`
    decode steps (the last token is sampled without another pass), with `skipped` layers bypassed."""
    active = shape.layers - skipped
    weight_bytes = (active * shape.layer_params + shape.head_params) * shape.dtype_bytes
    kv_per_position = active * 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes  # K and V, per row
    attn_flops = 4 * active * shape.heads * shape.head_dim  # QK^T and PV, per query and key position
    matmul_flops = 2 * (active * shape.layer_params + shape.head_params)  # per token
    # (tokens this pass, positions each attends over on average, cached positions read per row)
    passes = [(rows * prompt_len, (prompt_len + 1) / 2, 0)]
    passes += [(rows, prompt_len + t, prompt_len + t) for t in range(1, new_tokens)]
    compute = weights = kv = floor = 0.0
    for tokens, context, cached in passes:
        c = tokens * (matmul_flops + attn_flops * context) / machine.flops_per_s
        w = weight_bytes / machine.bytes_per_s
        k = rows * cached * kv_per_position / machine.bytes_per_s
        compute, weights, kv, floor = compute + c, weights + w, kv + k, floor + max(c, w + k)
    return Floor(compute, weights, kv, floor)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(fn, device, repeats: int, budget_s: float) -> float:
    """The shortest of up to `repeats` timed calls of fn (after one warm-up), stopping once `budget_s` is spent."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def matmul_rate(shapes: list[tuple[int, int, int]], device, dtype, rows: int = 4096, repeats: int = 20,
                budget_s: float = 0.5) -> float:
    """FLOP/s of the products [rows, k] @ [k, n] over `shapes` (k, n, how many of it per token) taken
    together, each product at its fastest of `repeats` runs and counted as often as a token meets it."""
    flops = seconds = 0.0
    for k, n, count in shapes:
        a = torch.randn(rows, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        seconds += count * _fastest(lambda: a @ b, device, repeats, budget_s)
        flops += count * 2.0 * rows * k * n
    return flops / seconds


def copy_bandwidth(device, megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes per second (read + write) of copying a `megabytes` buffer on `device`, at its fastest copy."""
    a = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    return 2 * a.numel() / _fastest(lambda: b.copy_(a), device, repeats, budget_s=1.0)


def product_shapes(model) -> list[tuple[int, int, int]]:
    """(k, n, count) of the matrix products a token meets: every linear map of a decoder layer ([*, k] @ [k, n],
    counted once per layer; nn.Linear and transformers' GPT-2-style Conv1D) and the LM head (once)."""
    layers = find_layers(model).layers
    counts = {}
    for module in layers[0].modules():
        if isinstance(module, nn.Linear):
            k, n = module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
            k, n = module.weight.shape
        else:
            continue
        counts[(k, n)] = counts.get((k, n), 0) + len(layers)
    head = model.get_output_embeddings().weight  # [V, H]
    counts[(head.shape[1], head.shape[0])] = counts.get((head.shape[1], head.shape[0]), 0) + 1
    return [(k, n, count) for (k, n), count in counts.items()]


def measure_machine(model) -> Machine:
    """R on this model's own product shapes (`product_shapes`) in its dtype and on its device, and B from a
    512 MiB copy there. On a CPU at a 7B model's shapes this takes a few minutes."""
    weight = next(model.parameters())
    return Machine(matmul_rate(product_shapes(model), weight.device, weight.dtype), copy_bandwidth(weight.device))

"""The machine's floor for a rollout: the least time its arithmetic and its memory traffic allow (a roofline).

Choices:
- A rollout is its forward passes: the prefill (each distinct prompt's tokens once, the LM head at its last
  position only: what an engine must do, and what the eager engine does; the CUDA-graph decoder prefills
  every row, which shows as a lower share) and one decode step per new token.
  Each pass must do its arithmetic (2 x active parameters per token, plus attention's two products over
  the context) and read every active weight once and, in attention, the KV cache of every row up to the
  context. Its floor is max(arithmetic / R, bytes / B); a rollout's floor is the sum over its passes.
  Masks, norms, rotary, sampling and cache writes are left out, so 1.0 is out of reach by a margin.
- R (FLOP/s) is measured on the model's own products ([rows, k] @ [k, n] for each linear map of a layer
  and the LM head, each weighted by how often a token meets it) at 4096 rows, in the model's dtype; B (bytes/s)
  from copying a buffer larger than the caches (read + write). Each is the fastest of several timed runs:
  what this process can get on this device, so the floor is one a run could approach, not a data-sheet
  figure. Reads that stay in the last-level cache (a small model's weights) can beat B, so for such models
  the memory part is an estimate rather than a strict bound.
- Mixture-of-experts layers (a decoder layer's `experts` module, as every HF MoE family names it): a token's
  arithmetic meets k of the E routed experts (`num_experts_per_tok`); a pass of T tokens reads the expected
  share of experts that at least one of its tokens is routed to, 1 - (1 - k/E)^T under uniform routing
  (all of them at a decode step of many rows, k/E at one row). Shared experts and routers are dense.
- Attention is read per layer from the KV cache transformers builds for the model (what the decode loop
  uses), after one token's forward: a sliding-window layer attends over, and reads the KV of, at most its
  window; a recurrent layer (Mamba, gated delta rule) has no KV cache and attends over nothing (its state
  is left out); a layer's K and V widths are its cache's, so layers of different head sizes (Gemma 4) and
  multi-head latent attention (which caches a compressed latent; its products' widths come from
  `qk_head_dim`/`v_head_dim`) are counted as they run; a KV-sharing placeholder reads the KV of the last
  earlier layer of its kind (`layer_types`).
- `weights_s` alone (weight bytes / B per pass) is the memory-bandwidth floor of plain decoding; at these
  batch sizes the KV cache (`kv_s`) is often larger, and on a small CPU model the arithmetic dominates.
- A nested model skips U of the N layers: its active layers, KV cache and arithmetic are (N - U) / N of the
  decoder's; the embedding, final norm and LM head always run.
"""

import math
import time
from typing import NamedTuple

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

from nested_reft.nested import find_layers, text_config
from nested_reft.rollout import cache_kwarg


class Machine(NamedTuple):
    flops_per_s: float  # R: the model's products at 4096 rows, in its dtype
    bytes_per_s: float  # B: a large copy's read + write bytes per second


class Floor(NamedTuple):
    compute_s: float  # arithmetic / R, summed over the passes
    weights_s: float  # weight bytes / B, summed over the passes
    kv_s: float  # KV-cache bytes read by attention / B, summed over the passes
    floor_s: float  # sum over passes of max(arithmetic / R, (weights + KV) / B)


class LayerAttention(NamedTuple):
    span: float  # the most positions the layer attends over: inf (full), its window, 0 (no attention)
    flops: int  # QK^T and PV FLOPs per query and key position: 2 x heads x (d_qk + d_v)
    kv_elements: int  # K and V elements it reads per row and key position (its cache's, or the one it shares)


class ModelShape(NamedTuple):
    layers: int  # N decoder layers
    layer_params: int  # parameters of one decoder layer (the mean over layers)
    head_params: int  # LM head parameters (vocab x hidden), read at every pass
    attention: tuple[LayerAttention, ...]  # per decoder layer
    dtype_bytes: int  # bytes per weight and cache element
    expert_params: int = 0  # of layer_params: one layer's routed experts, all E of them (mean over layers)
    experts: int = 0  # E routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 0  # k: the experts each token is routed to


def model_shape(model) -> ModelShape:
    """The counts the floor needs, read from a Hugging Face causal LM (and its KV cache after one token)."""
    layers = list(find_layers(model).layers)
    weight = next(model.parameters())
    layer_params = sum(p.numel() for layer in layers for p in layer.parameters()) // len(layers)
    routed, experts, per_token = routed_experts(model)
    return ModelShape(len(layers), layer_params, model.get_output_embeddings().weight.numel(),
                      layer_attention(model), weight.element_size(),
                      expert_params=sum(p.numel() for m in routed for p in m.parameters()) // len(layers),
                      experts=experts, experts_per_token=per_token)


def routed_experts(model) -> tuple[list[nn.Module], int, int]:
    """(each MoE layer's `experts` module, E, k): E from a list of expert MLPs or transformers 5's fused
    [E, ...] weights, k from `num_experts_per_tok` (E when the config has none); ([], 0, 0) for a dense model."""
    routed = [module for layer in find_layers(model).layers for name, module in layer.named_modules()
              if name.rsplit(".", 1)[-1] == "experts"]
    if not routed:
        return [], 0, 0
    first = routed[0]
    experts = len(first) if isinstance(first, nn.ModuleList) else next(p.shape[0] for p in first.parameters()
                                                                       if p.ndim == 3)
    return routed, experts, getattr(text_config(model), "num_experts_per_tok", None) or experts


def layer_attention(model) -> tuple[LayerAttention, ...]:
    """Each layer's attention, from the KV cache transformers builds for `model` after one token's forward:
    a sliding-window layer spans its window, a full-attention layer everything, a layer with no KV cache
    (recurrent state only) nothing. The K and V widths are its cache's ([1, H_kv, 1, D]; multi-head latent
    attention caches a compressed latent and takes its products' widths from `qk_head_dim`/`v_head_dim`). A
    placeholder layer (`DummyLayer`) reads the KV of the last earlier layer of its config `layer_types` kind,
    and has no attention if there is none (a MoE or MLP-only layer)."""
    c = text_config(model)
    cache = DynamicCache(config=model.config)
    ids = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    types = getattr(c, "layer_types", None) or [None] * len(cache.layers)
    out, last = [], {}  # last: the attention of the latest caching layer of each kind
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DummyLayer):
            out.append(last.get(types[i], LayerAttention(0.0, 0, 0)))
            continue
        keys = getattr(layer, "keys", None)
        if not isinstance(layer, DynamicLayer) or keys is None or not keys.numel():
            out.append(LayerAttention(0.0, 0, 0))
            continue
        lc = c.per_layer_config[i] if hasattr(type(c), "per_layer_config") else c
        qk = getattr(lc, "qk_head_dim", None) or keys.shape[-1]  # MLA: wider than its cached latent
        v = getattr(lc, "v_head_dim", None) or layer.values.shape[-1]
        span = float(layer.sliding_window) if isinstance(layer, DynamicSlidingWindowLayer) else math.inf
        out.append(LayerAttention(span, 2 * lc.num_attention_heads * (qk + v), keys.numel() + layer.values.numel()))
        last[types[i]] = out[-1]
    return tuple(out)


def attended(shape: ModelShape, context: float) -> tuple[float, float]:
    """(attention FLOPs, K and V elements read) of one query at `context`, summed over the decoder's layers."""
    spans = [(min(context, a.span), a) for a in shape.attention]
    return sum(n * a.flops for n, a in spans), sum(n * a.kv_elements for n, a in spans)


def layer_params_used(shape: ModelShape, tokens: float = 1.0) -> float:
    """Parameters of one decoder layer that `tokens` tokens routed together use: every dense one, and of the
    routed experts the expected share that at least one token meets (k/E of them for one token)."""
    if not shape.experts:
        return shape.layer_params
    hit = 1.0 - (1.0 - shape.experts_per_token / shape.experts) ** tokens
    return shape.layer_params - shape.expert_params * (1.0 - hit)


def rollout_floor(shape: ModelShape, machine: Machine, rows: int, prompt_len: int, new_tokens: int,
                  skipped: int = 0, prompts: int | None = None) -> Floor:
    """The floor of a fixed-length rollout: `rows` rows, a `prompt_len`-token prefill of the `prompts` distinct
    prompts among them (default: every row; an engine need prefill a prompt once for its G completions), the LM
    head at each prompt's last position only, then `new_tokens` decode steps (the last token is sampled
    without another pass), with `skipped` layers bypassed."""
    active = (shape.layers - skipped) / shape.layers  # the share of layers that run (their mean span)
    prompts = rows if prompts is None else prompts
    # (tokens through the layers, rows through the head, attention FLOPs per token, KV elements the pass reads)
    prefill = [attended(shape, i)[0] for i in range(1, prompt_len + 1)]
    passes = [(prompts * prompt_len, prompts, sum(prefill) / max(prompt_len, 1), 0.0)]
    for t in range(1, new_tokens):
        flops, elements = attended(shape, prompt_len + t)
        passes.append((rows, rows, flops, rows * elements))
    compute = weights = kv = floor = 0.0
    for tokens, head_rows, attn, kv_elements in passes:
        layer_flops = 2 * active * shape.layers * layer_params_used(shape) + active * attn
        c = (tokens * layer_flops + head_rows * 2 * shape.head_params) / machine.flops_per_s
        read = active * shape.layers * layer_params_used(shape, tokens) + shape.head_params
        w = read * shape.dtype_bytes / machine.bytes_per_s
        k = active * kv_elements * shape.dtype_bytes / machine.bytes_per_s
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


def matmul_rate(shapes: list[tuple[int, int, float]], device, dtype, rows: int = 4096, repeats: int = 20,
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


def product_shapes(model) -> list[tuple[int, int, float]]:
    """(k, n, how many per token) of the matrix products a token meets: every linear map of every decoder
    layer ([*, k] @ [k, n]; nn.Linear and transformers' GPT-2-style Conv1D), the LM head once, and of a MoE
    layer's routed experts the k a token is routed to (an expert list's maps, or fused [E, n, k] weights
    applied as F.linear applies them, [E, k, n] where the experts module says `is_transposed`)."""
    counts: dict[tuple[int, int], float] = {}

    def add(k: int, n: int, count: float) -> None:
        counts[(k, n)] = counts.get((k, n), 0) + count

    _, experts, per_token = routed_experts(model)
    routed = per_token / experts if experts else 1.0  # a token meets k of the E experts
    for layer in find_layers(model).layers:
        for name, module in layer.named_modules():
            share = routed if "experts" in name.split(".") else 1.0
            if isinstance(module, nn.Linear):
                add(module.in_features, module.out_features, share)
            elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
                add(*module.weight.shape, share)
            elif name.rsplit(".", 1)[-1] == "experts":
                transposed = getattr(module, "is_transposed", False)  # [E, k, n] (x @ W), else [E, n, k] (F.linear)
                for p in module.parameters(recurse=False):
                    if p.ndim == 3:
                        add(*(p.shape[1:] if transposed else p.shape[:0:-1]), per_token)
    head = model.get_output_embeddings().weight  # [V, H]
    add(head.shape[1], head.shape[0], 1)
    return [(k, n, count) for (k, n), count in counts.items()]


def measure_machine(model) -> Machine:
    """R on this model's own product shapes (`product_shapes`) in its dtype and on its device, and B from a
    512 MiB copy there. On a CPU at a 7B model's shapes this takes a few minutes."""
    weight = next(model.parameters())
    return Machine(matmul_rate(product_shapes(model), weight.device, weight.dtype), copy_bandwidth(weight.device))

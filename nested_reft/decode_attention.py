"""Attention for the decode loop's one-token steps on CPU: two batched products over the KV cache.

Choices:
- At one query per row, torch's CPU flash-attention kernel (what SDPA runs there) costs more than two plain
  batched products: it was 35% of a decode step of the TRL peer job's model (128 rows, contexts of 24-56
  positions) in the profiler, and the products take the rollout from 2.10 to 1.95 s (fixed 64 tokens) and
  from 1.21 to 1.13 s (EOS-terminated) with the same tokens (docs/benchmarks.md).
- Grouped-query attention without repeating K/V: the G query heads of a KV head are viewed as [m, KV, G, D]
  and multiplied against that head's cache; the padding mask (SDPA's boolean or additive mask) applies to
  the scores before the softmax. The result equals SDPA's to float rounding (log-probs within 1e-6).
- Registered with transformers' attention and mask interfaces under `NAME` (the mask is SDPA's), and
  switched on by `single_query_attention(model)` for the decode loop only: on CPU, for models whose
  attention is "sdpa". Anything else goes to SDPA's own function: the prefill (more than one query),
  soft-capped scores (Gemma 2), attention sinks (gpt-oss), dropout. CUDA keeps SDPA's fused kernels.
"""

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nested_reft.nested import unwrap_adapters

NAME = "nested_reft_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [m, H, q, D], key/value [m, KV, S, D] -> ([m, q, H, D], None).
    One query per row takes two batched products; anything else is SDPA's."""
    m, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.view(m, kv_heads, heads // kv_heads, dim)  # [m, KV, G, D]
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scale  # [m, KV, G, S]
    if attention_mask is not None:
        mask = attention_mask.view(attention_mask.shape[0], 1, 1, -1)  # [m or 1, 1, 1, S]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1), value)  # [m, KV, G, Dv]
    return out.reshape(m, 1, heads, value.shape[-1]), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def single_query_attention(model):
    """Within the block a CPU model whose attention is SDPA decodes with `decode_attention`; otherwise (CUDA,
    eager, flash, flex) nothing changes. The setting is restored on exit."""
    config = unwrap_adapters(model).config
    before = config._attn_implementation
    device = next(model.parameters()).device
    if before != "sdpa" or device.type != "cpu":
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before

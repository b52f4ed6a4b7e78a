"""Attention for the decode loop's one-token steps on CPU: two batched products over the KV cache.

Choices:
- At one query per row, torch's CPU flash-attention kernel (what SDPA runs there) costs more than two plain
  batched products: it was 35% of a decode step of the TRL peer job's model (128 rows, contexts of 24-56
  positions) in the profiler, and the products take the rollout from 2.03 to 1.83 s (fixed 64 tokens) and
  from 1.16 to 1.09 s (EOS-terminated) with the same tokens (docs/benchmarks.md).
- Grouped-query attention without repeating K/V: the G query heads of a KV head are viewed as [m, KV, G, D]
  and multiplied against that head's cache (head h reads KV head h // G, as transformers' repeat_kv); the
  padding mask (SDPA's boolean or additive [m or 1, 1, 1, S] mask) applies to the scores before the
  softmax. In float32 the result equals SDPA's to rounding (log-probs within 1e-6).
- Registered with transformers' attention and mask interfaces under `NAME` (the mask is SDPA's), and
  switched on by `single_query_attention(model)` for the decode loop only, on the text config alone: on
  CPU, for float32 models of the families in `FAMILIES` whose attention is "sdpa". Some modeling files
  branch on the attention's name (sparse-attention indexers keep their mask only for "eager"/"sdpa"), so
  the switch is limited to families checked against SDPA (tests/test_decode_attention.py). Anything
  unusual goes to SDPA's own function: the prefill (more than one query), non-float32 tensors, dropout,
  per-head masks (ALiBi), and any keyword argument beyond the plain ones (position bias, sinks, soft-capping).
  CUDA keeps SDPA's fused kernels.
"""

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nested_reft.nested import text_config, unwrap_adapters

NAME = "nested_reft_decode"

#: model_type of the text configs switched to `decode_attention` (each checked against SDPA in the tests).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma3_text", "gpt2", "gpt_neox", "opt")

#: Keyword arguments an attention call may carry that do not change a one-token step over a masked cache.
PLAIN_KWARGS = {"sliding_window", "position_ids", "is_causal", "output_attentions", "cache_position", "use_cache",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def _plain(query, attention_mask, dropout, kwargs) -> bool:
    """Whether this call is a one-token float32 step that the two products compute exactly as SDPA."""
    return (query.shape[2] == 1 and query.dtype == torch.float32 and not dropout
            and (attention_mask is None or attention_mask.shape[1] == 1)
            and all(v is None or v is False or k in PLAIN_KWARGS for k, v in kwargs.items()))


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [m, H, q, D], key/value [m, KV, S, D] -> ([m, q, H, D], None).
    A plain one-token step (`_plain`) takes two batched products; anything else is SDPA's."""
    if not _plain(query, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    m, heads, _, dim = query.shape
    kv_heads = key.shape[1]
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
    """Within the block a float32 CPU model of `FAMILIES` whose attention is SDPA decodes with
    `decode_attention`; otherwise nothing changes. Only the text config is switched, and restored on exit."""
    config = text_config(unwrap_adapters(model))
    before = config._attn_implementation
    weight = next(model.parameters())
    if (before != "sdpa" or weight.device.type != "cpu" or weight.dtype != torch.float32
            or getattr(config, "model_type", None) not in FAMILIES):
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before

"""kv_cache.py: the preallocated cache gives the same decoding as HF's DynamicCache, row compaction included."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from conftest import tiny_model
from nested_reft.kv_cache import PreallocatedLayer, decode_cache
from nested_reft.nested import skip_layers
from nested_reft.rollout import cache_kwarg


def decode_logits(model, cache, ids, steps, keep=None):
    """Greedy-decode `steps` tokens from ids [N, P] with `cache`; optionally keep only rows `keep` after the
    first step (batch_select_indices). Returns the last-position logits of every step."""
    kw = {cache_kwarg(model): cache}
    out = model(input_ids=ids, use_cache=True, **kw)
    logits, tok = [out.logits[:, -1]], out.logits[:, -1].argmax(-1)
    for t in range(steps):
        if t == 1 and keep is not None:
            cache.batch_select_indices(keep)
            tok = tok[keep]
        pos = torch.full((tok.size(0), 1), ids.size(1) + t)
        out = model(input_ids=tok[:, None], position_ids=pos, use_cache=True, **kw)
        logits.append(out.logits[:, -1])
        tok = out.logits[:, -1].argmax(-1)
    return logits


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral", "qwen2-sliding"])
def test_preallocated_cache_decodes_like_the_dynamic_cache(family):
    model = tiny_model(family)
    ids = torch.randint(4, 90, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = decode_logits(model, DynamicCache(config=model.config), ids, 6)
        cache = decode_cache(model, 5 + 6)
        got = decode_logits(model, cache, ids, 6)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    kinds = {type(layer) for layer in cache.layers}
    assert PreallocatedLayer in kinds or family == "mistral"  # Mistral's layers are all sliding (window 4)
    if family in ("mistral", "qwen2-sliding"):  # windowed layers keep HF's own windowed cache
        assert DynamicSlidingWindowLayer in kinds


def test_a_nested_model_gets_a_cache_of_its_own_layers():
    model = tiny_model("qwen2")
    with skip_layers(model, (0, 3)):
        assert len(decode_cache(model, 8).layers) == 4


def test_dropping_rows_keeps_the_other_rows_exact():
    model = tiny_model("llama")
    ids = torch.randint(4, 90, (4, 5), generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([0, 2, 3])
    with torch.no_grad():
        full = decode_logits(model, decode_cache(model, 12), ids, 5)
        kept = decode_logits(model, decode_cache(model, 12), ids, 5, keep=keep)
    for a, b in zip(full[2:], kept[2:]):  # steps after the drop
        torch.testing.assert_close(a[keep], b, rtol=0, atol=1e-5)


def test_capacity_is_enforced():
    layer = PreallocatedLayer(capacity=3)
    layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    assert layer.get_seq_length() == 2
    with pytest.raises(RuntimeError, match="capacity 3 exceeded"):
        layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))


def test_compaction_copies_the_kept_rows_and_keeps_writing_after_them():
    layer = PreallocatedLayer(capacity=6)
    k, v = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 5)
    layer.update(k, v)
    layer.batch_select_indices(torch.tensor([3, 1]))
    assert torch.equal(layer.keys, k[[3, 1]]) and torch.equal(layer.values, v[[3, 1]])
    k2, v2 = torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 5)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k[[3, 1]], k2], dim=2)) and torch.equal(values, torch.cat([v[[3, 1]], v2], dim=2))
    layer.batch_select_indices(torch.tensor([1]))  # a second compaction, from a compacted buffer
    assert torch.equal(layer.keys, torch.cat([k[[1]], k2[[1]]], dim=2)) and layer.key_buffer.shape == (1, 2, 6, 5)



def test_selecting_a_row_twice_copies_it():
    layer = PreallocatedLayer(capacity=5)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    layer.update(k, v)
    layer.batch_select_indices(torch.tensor([1, 0, 1, 1]))
    assert torch.equal(layer.keys, k[[1, 0, 1, 1]]) and torch.equal(layer.values, v[[1, 0, 1, 1]])
    k2, v2 = torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4)
    keys, _ = layer.update(k2, v2)  # the copies are separate rows from here on
    assert torch.equal(keys, torch.cat([k[[1, 0, 1, 1]], k2], dim=2)) and layer.key_buffer.shape == (4, 2, 5, 4)

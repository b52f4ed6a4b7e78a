"""The decode loop's KV cache: preallocated, written in place, never re-concatenated.

Choices:
- `decode_cache(model, capacity)` is the model's own DynamicCache (built from its config: a nested model
  gets its K layers, sliding-window layers keep their windowed layers) whose plain full-attention layers
  are `PreallocatedLayer`s: [N, H, capacity, D] buffers allocated at the first update, written in place,
  read as views of the filled part. DynamicLayer concatenates the whole cache at every token (most of the
  decode loop's time on CPU at small widths); the values seen by attention are the same.
  `batch_select_indices(indices)` builds new buffers from the rows `indices` (repeats allowed), copying only
  the filled positions: it drops finished rows (the loop's compaction) and copies a prompt's prefilled
  rows to the rows that repeat it (rollout.EagerDecoder.prefill). It copies by `index_select`: on CPU,
  advanced indexing of the whole buffer took 4 to 6 times as long (92-613 us against 16-60 us per buffer
  at the peer job's shapes). `select_cache_rows(cache, indices)` does it for every layer of a cache:
  attention layers select their keys and values, the stateless placeholders of layers that read another
  layer's KV (Gemma 4) have nothing to select, and the linear-attention layers of hybrid models (Mamba,
  gated delta rule: Bamba, Jamba, Granite hybrids, Qwen3-Next), which have no `batch_select_indices` in
  transformers 5.25, select the batch rows of their conv and recurrent states with the layer's own
  `reorder_cache` (beam search's row selection; both states are batch-first, and a row's state depends on
  that row alone). A cache holding any other kind of layer cannot copy rows (`selects_rows`): it keeps every
  row to the end and runs each prompt's prefill once per row.
"""

import torch
from transformers import DynamicCache, cache_utils
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV-cache layer whose keys and values live in [N, H, capacity, D] buffers allocated at
    the first update; each update writes the new positions in place and returns views of the filled part.
    The values are DynamicLayer's, without re-concatenating the whole cache at every token."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        n, h = key_states.shape[:2]
        self.key_buffer = key_states.new_empty((n, h, self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((n, h, self.capacity, value_states.shape[-1]))
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self.key_buffer[:, :, start:end].copy_(key_states)
        self.value_buffer[:, :, start:end].copy_(value_states)
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PreallocatedLayer serves the rollout loop (update, batch_select_indices); "
                                  "use a DynamicCache for beam search, cache repetition or offloading")

    reorder_cache = batch_repeat_interleave = offload = prefetch = crop = _unsupported

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (finished rows leave the batch)."""
        if self.is_initialized:
            length = self.keys.shape[-2]
            self.key_buffer = select_rows(self.key_buffer, indices, length)
            self.value_buffer = select_rows(self.value_buffer, indices, length)
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]


def select_rows(buffer: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    """A new [m, H, capacity, D] buffer holding rows `indices` [m] of buffer [N, H, capacity, D] at positions
    [:length]; the positions after it are left unwritten."""
    out = buffer.new_empty((indices.numel(), *buffer.shape[1:]))
    torch.index_select(buffer[:, :, :length], 0, indices, out=out[:, :, :length])
    return out


def decode_cache(model, capacity: int) -> DynamicCache:
    """The model's DynamicCache (built from its config, so a nested model gets its own K layers and sliding
    layers keep their windowed layers) with every plain full-attention layer preallocated for `capacity`
    positions (prompt + completion)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


#: Cache layer classes whose batch_select_indices carries all of their state (keys and values, an indexer's keys;
#: none for DummyLayer, the placeholder of a layer that reads another layer's KV or has no attention).
ROW_LAYERS = tuple(getattr(cache_utils, name) for name in ("DynamicLayer", "DynamicSlidingWindowLayer",
                                                           "DynamicIndexedLayer", "DummyLayer")
                   if hasattr(cache_utils, name))

#: Linear-attention cache layer classes whose whole per-row state is their conv and recurrent states, selected
#: by `reorder_cache` (those combined with an attention layer also select their keys and values).
STATE_LAYERS = tuple(getattr(cache_utils, name) for name in (
    "LinearAttentionLayer", "LinearAttentionAndFullAttentionLayer", "LinearAttentionAndSlidingWindowAttentionLayer")
    if hasattr(cache_utils, name))


def selects_rows(cache) -> bool:
    """Whether `select_cache_rows` can copy and drop batch rows of every layer of `cache` with all its state."""
    return all(type(layer) in ROW_LAYERS + STATE_LAYERS or isinstance(layer, PreallocatedLayer)
               for layer in cache.layers)


def select_cache_rows(cache, indices: torch.Tensor) -> None:
    """Keep rows `indices` [m] (repeats allowed) of every layer of `cache` (which `selects_rows`), in order."""
    for layer in cache.layers:
        if isinstance(layer, STATE_LAYERS):  # conv and recurrent states
            cache_utils.LinearAttentionCacheLayerMixin.reorder_cache(layer, indices)
        if isinstance(layer, ROW_LAYERS):  # keys and values (PreallocatedLayer; a combined layer has both)
            layer.batch_select_indices(indices)

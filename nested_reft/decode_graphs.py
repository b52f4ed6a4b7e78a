"""CUDA graphs for the decode loop's one-token steps (`--cuda-graphs`, CUDA only, off by default).

Choices:
- The steps run over transformers' own StaticCache: [m, H, capacity, D] buffers written with index_copy_ at
  a position counter kept in a tensor, attention over the whole capacity with the causal mask hiding the
  positions not yet written. Every tensor a step reads or writes then keeps its shape and address, which a
  CUDA graph needs, and transformers builds its masks without host syncs while a stream is capturing.
- One graph per batch composition: the first step after the prefill, or after finished rows left the batch
  (`select`), runs eagerly (it is also the warm-up), then the step is captured as the model stands, the
  nested model's layer list included (the skip set is part of the graph), and replayed for the following
  tokens, each replay reading the tokens and positions copied into the captured input buffers. A rollout's
  graphs share one memory pool and are freed with the decoder; a composition's graph is kept until the
  next one is captured (a pool whose graphs are all gone cannot take another capture while its memory is
  still in use, and the last logits read are in it).
- Sampling stays outside the graph (rollout.sample, the same uniforms), so tokens are drawn exactly as in
  the eager loop from logits that differ from the eager loop's by float rounding (attention sums over the
  whole capacity, where the masked positions weigh exactly 0).
- Under bf16 autocast the rollout decodes under no_grad, where autocast keeps one lower-precision copy of
  each trainable float32 weight (rollout._decode_mode): the prefill makes them, before any capture, so the
  graphs read those copies instead of casting every weight at every replay; generate drops them after the
  graphs. A LoRA run's frozen base weights are not kept by autocast: the graphs cast them at every replay.
- Only for models whose cache is all full-attention layers (sliding windows and hybrid caches keep the
  eager loop) attending through SDPA or eager attention (flash-attention's unpadding reads lengths on the
  host), without a dynamic rotary scaling (it compares lengths on the host), not under FSDP (its forward is
  a collective), and not on CPU, where there is no graph to capture: there `GraphDecoder` can run its
  static steps with a stand-in `capture`, which is how the tests check its bookkeeping against the eager
  loop.
"""

import functools
from collections.abc import Callable

import torch
import transformers
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from nested_reft.nested import text_config


def graphs_problem(model, device: torch.device) -> str | None:
    """Why `--cuda-graphs` cannot serve this model on `device` (None when it can)."""
    from torch.distributed.fsdp import FSDPModule

    if device.type != "cuda":
        return f"cuda_graphs=true needs a CUDA device (this run decodes on {device.type})"
    if isinstance(model, FSDPModule):
        return "cuda_graphs=true is not supported under FSDP (every forward is a collective)"
    layers = StaticCache(config=model.config, max_cache_len=1).layers
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return (f"cuda_graphs=true needs a model whose every layer attends to the whole context "
                f"({type(model).__name__} has sliding-window or other cache layers); drop --cuda-graphs")
    config = text_config(model)
    if config._attn_implementation not in ("sdpa", "eager"):
        return (f"cuda_graphs=true needs SDPA or eager attention, not {config._attn_implementation!r} "
                f"(load the model with attn_implementation='sdpa'); drop --cuda-graphs")
    rope = getattr(config, "rope_parameters", None) or {}  # one dict, or one per layer type
    kinds = [rope] if "rope_type" in rope else [r for r in rope.values() if isinstance(r, dict)]
    if any("dynamic" in str(r.get("rope_type", "")) for r in kinds):
        return "cuda_graphs=true cannot capture dynamic rotary scaling (it checks lengths on the host)"
    if not isinstance(getattr(layers[0], "cumulative_length", None), torch.Tensor):  # written where a replay moves it
        return (f"cuda_graphs=true needs a transformers whose StaticCache keeps its write position in a tensor "
                f"(5.25 does; this is {transformers.__version__}); drop --cuda-graphs or upgrade transformers")
    return None


@functools.cache
def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of every capture on a device: one for the process, since cuBLAS keeps a workspace for
    each stream it has run on."""
    return torch.cuda.Stream(device)


def capture_cuda_graph(forward: Callable[[], torch.Tensor], pool, stream) -> tuple[torch.Tensor, Callable,
                                                                               torch.Tensor]:
    """Run `forward` once on the side `stream` (the warm-up torch asks for before a capture; its output is
    this step's), then capture it there into a CUDA graph using memory `pool`. Returns (the warm-up's output,
    the graph's replay, the output tensor every replay rewrites). capture_begin/capture_end directly rather
    than `torch.cuda.graph`, which synchronises the device and empties the allocator's cache at every capture
    (a capture per compaction would hand the trainer's cached memory back each time)."""
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        first = forward()
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")  # other threads may use CUDA
        try:
            static_out = forward()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    first.record_stream(torch.cuda.current_stream())  # made on the side stream, read (and freed) on this one
    return first, graph.replay, static_out


class GraphDecoder:
    """Prefill and one-token steps for rollout._decode over a StaticCache, each batch composition's steps
    replayed from one captured graph. `capture(forward)` returns (first output, replay, static output) as
    `capture_cuda_graph` does; left None it is that function with a pool of this decoder's own."""

    drops_rows = True  # the StaticCache's full-attention layers (graphs_problem refuses any other) drop rows

    def __init__(self, model, capacity: int, cache_kwarg: str, capture=None):
        self.model, self.kwarg = model, cache_kwarg
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        if capture is None:
            pool, stream = torch.cuda.graph_pool_handle(), capture_stream(next(model.parameters()).device)
            capture = lambda forward: capture_cuda_graph(forward, pool, stream)  # noqa: E731
        self.capture = capture
        self.replay = None  # the current composition's graph, once captured
        self.retired = None  # the previous composition's graph and output, kept until the next capture
        self.inputs = None  # (tokens [m, 1], positions [m, 1], mask [m, capacity]): the graph's input buffers
        self.out = None  # [m, 1, V]: what every replay rewrites

    def _forward(self) -> torch.Tensor:
        tok, pos, mask = self.inputs
        return self.model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True,
                          **{self.kwarg: self.cache}).logits

    def prefill(self, ids, full_mask, positions) -> torch.Tensor:
        """Logits [N, V] at the last prompt position; ids/positions [N, P], full_mask [N, capacity]."""
        return self.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self.kwarg: self.cache}).logits[:, -1]

    def step(self, tok, positions, full_mask, filled: int) -> torch.Tensor:
        """Logits [m, V] after tokens tok [m] at positions [m, 1]; full_mask [m, capacity] is the mask of the
        whole capacity (the cache's counter knows how much is `filled`)."""
        if self.replay is None:
            self.inputs = (tok[:, None].clone(), positions.clone(), full_mask.clone())
            first, self.replay, self.out = self.capture(self._forward)
            self.retired = None
            return first[:, -1]
        self.inputs[0].copy_(tok[:, None])
        self.inputs[1].copy_(positions)
        self.replay()
        return self.out[:, -1]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the cache rows `keep` [m']; the next step captures a graph for the new batch."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
                layer.batch_size = keep.numel()
        self.retired = (self.replay, self.out)
        self.replay = self.inputs = self.out = None

"""Memory-bounded token log-probs: the output head and the log-softmax fused, chunk by chunk of tokens.

`chunked_logprobs(hidden, weight, bias, labels, ...)` returns what
``objectives.token_logprobs(F.linear(hidden, weight, bias), labels, ...)`` returns (the log-prob of each
label under softmax(logits / T), EOS-like ids banned before `banned_until`, optionally the entropy),
without ever holding the logits [N, L, V]; `scored_head(model, labels, ...)` makes an HF causal LM's own
forward return it in place of its logits, so DDP/FSDP2 hooks and PEFT wrappers stay in the path.

Choices:
- **Memory.** The forward computes one chunk of `chunk_tokens` tokens at a time and keeps only the
  per-token logsumexp [N*L]; the backward recomputes each chunk's logits and turns them into the
  gradient in place. Saved for backward: hidden, weight, bias, labels, the logsumexp. The default chunk
  is ``max(1, CHUNK_BUDGET // V)`` tokens with ``CHUNK_BUDGET = 2**25`` float32 elements (128 MiB of
  logits per chunk, 220 tokens at Qwen2.5's V = 151,936); a chunk needs about 2-3 such buffers at once.
  The gradient of `weight` is accumulated over the chunks in float32 (in the weight's dtype when that
  is wider): for a bf16/fp16 weight that is one extra [V, H] float32 buffer during the backward.
- **Numerics.** The matmul runs in the promoted dtype of hidden and weight (a bf16 hidden with an fp32
  weight is upcast chunk by chunk), under whatever autocast is active, as ``nn.Linear`` would; the
  backward recomputes under the same autocast state, so it sees the same logits. Everything after the
  matmul (temperature, ban, log-softmax, entropy, the logits' gradient) is float32 (float64 for float64
  inputs), so the result equals the unfused reference to float32 rounding.
- **Ban.** At positions t < banned_until the `banned` ids get logit -inf (probability 0) and no
  gradient, as `token_logprobs` and the sampler do; a banned label there scores -inf.
- **Which models.** `scored_head` replaces the module `get_output_embeddings()` returns for the length
  of the forward. That is only right when the CausalLM forward returns ``lm_head(hidden)`` untouched.
  In transformers 5.25 the modeling files transform the logits after the head in these ways (found by
  reading every ``self.lm_head(...)`` call in models/*/modeling_*.py): tanh soft-capping by
  ``final_logit_softcapping`` (Gemma 2/3/3n/4, VaultGemma, NanoChat, PaliGemma, T5Gemma, Mistral-Large-4,
  Inkling2, Beam, diffusion Gemma, MuseSpark/Glimmer), ``logits_soft_cap`` (RecurrentGemma),
  ``output_logit_soft_cap`` (xLSTM); multiplication by ``logit_scale`` (Cohere, Cohere2, Aya Vision;
  Cohere's *default* is 0.0625), ``logits_scaling`` (HyperCLOVA X), ``lm_head_multiplier`` (Falcon-H1),
  ``output_multiplier`` (MuseSpark/Glimmer); division by ``logits_scaling`` (Granite family);
  truncation to ``unpadded_vocab_size`` (Inkling); masking of image tokens (Chameleon); a head subclass
  with its own per-token scale (Dory). `supports_scored_head` refuses any config (or text config) where
  one of those attributes holds a value that changes the logits, the Chameleon model type, and any head
  that is not a plain ``nn.Linear`` (subclass overriding forward, PEFT LoRA on the head) or that has
  hooks or a patched forward of its own (accelerate offload, a separate FSDP unit): those would be
  bypassed. `scored_head` also fails loudly if the forward did not call the head exactly once.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHUNK_BUDGET", "chunked_logprobs", "default_chunk_tokens", "scored_head", "ScoredHead",
           "supports_scored_head", "unsupported_reason"]

#: float32 elements of logits per chunk (128 MiB); the chunk is CHUNK_BUDGET // V tokens.
CHUNK_BUDGET = 2 ** 25

#: Config attributes that soft-cap the logits after the head: harmless only when None or 0.
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
#: Config attributes that scale the logits after the head: harmless only when None or 1.
_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
#: Model types whose forward edits the logits after the head whatever the config says.
_MODEL_TYPES = ("chameleon",)


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: as many as fit CHUNK_BUDGET float32 logits, at least one."""
    return max(1, CHUNK_BUDGET // max(1, vocab_size))


# ---- the fused function -----------------------------------------------------------------------


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _chunk_logits(h, weight, bias, lo, hi, length, temperature, banned, banned_until, dtype) -> torch.Tensor:
    """Scaled, banned float logits [c, V] of flattened tokens lo..hi (position t = index % length)."""
    z = F.linear(h[lo:hi].to(weight.dtype), weight, bias).to(dtype)
    if temperature != 1.0:
        z = z.div_(temperature)
    rows = _banned_rows(lo, hi, length, banned, banned_until, z.device)
    if rows is not None:
        z[rows.unsqueeze(1), banned.unsqueeze(0)] = float("-inf")
    return z  # [c, V]


def _banned_rows(lo, hi, length, banned, banned_until, device) -> torch.Tensor | None:
    """Chunk rows (0-based) whose position t < banned_until, or None when nothing is banned there. Built on
    the host (a copy to the device, no device sync)."""
    if banned is None or banned.numel() == 0 or banned_until <= 0:
        return None
    rows = (torch.arange(lo, hi) % length < banned_until).nonzero().squeeze(1)  # [k], on the host
    return rows.to(device) if rows.numel() else None


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, banned, banned_until, entropy, chunk):
        n, length, width = hidden.shape
        h = hidden.reshape(n * length, width)  # [T, H]
        y = labels.reshape(-1).long()  # [T]
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        dtype = torch.promote_types(mm_dtype, torch.float32)
        out = torch.empty(n * length, dtype=dtype, device=hidden.device)  # [T]
        lse = torch.empty_like(out)  # [T]
        ent = torch.empty_like(out) if entropy else out.new_empty(0)
        for lo in range(0, n * length, chunk):
            hi = min(lo + chunk, n * length)
            z = _chunk_logits(h, w, b, lo, hi, length, temperature, banned, banned_until, dtype)  # [c, V]
            lse[lo:hi] = torch.logsumexp(z, dim=-1)
            out[lo:hi] = z.gather(-1, y[lo:hi].unsqueeze(-1)).squeeze(-1) - lse[lo:hi]
            if entropy:  # H = logZ - E_p[z]; banned logits (-inf, p = 0) contribute 0
                p = (z - lse[lo:hi].unsqueeze(-1)).exp_()
                ent[lo:hi] = lse[lo:hi] - p.mul_(z.nan_to_num_(neginf=0.0)).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse, banned)
        ctx.config = (temperature, banned_until, chunk, hidden.device.type, _autocast_state(hidden.device.type))
        ent = ent.view(n, length) if entropy else ent
        ctx.mark_non_differentiable(ent)  # the tensor returned itself (a view made after marking would not be)
        return out.view(n, length), ent

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, bias, labels, lse, banned = ctx.saved_tensors
        temperature, banned_until, chunk, device_type, (cast, cast_dtype) = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out is None or not (need_h or need_w or need_b):
            return (None,) * 9
        with torch.autocast(device_type, dtype=cast_dtype, enabled=cast):
            grads = _backward(hidden, weight, bias, labels, lse, banned, grad_out, temperature, banned_until,
                              chunk, need_h, need_w, need_b)
        return (*grads, None, None, None, None, None, None)


def _backward(hidden, weight, bias, labels, lse, banned, grad_out, temperature, banned_until, chunk,
              need_h, need_w, need_b):
    """(grad hidden, grad weight, grad bias): per chunk grad_z = g * (onehot - softmax) / T, zero where banned."""
    n, length, width = hidden.shape
    h = hidden.reshape(n * length, width)  # [T, H]
    y = labels.reshape(-1).long()  # [T]
    g = grad_out.reshape(-1).to(lse.dtype)  # [T]
    mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    w = weight.to(mm_dtype)
    b = None if bias is None else bias.to(mm_dtype)
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_h = torch.empty_like(h) if need_h else None  # [T, H]
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None  # [V, H]
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None  # [V]
    for lo in range(0, n * length, chunk):
        hi = min(lo + chunk, n * length)
        z = _chunk_logits(h, w, b, lo, hi, length, temperature, banned, banned_until, lse.dtype)  # [c, V]
        gz = z.sub_(lse[lo:hi].unsqueeze(-1)).exp_().mul_(-g[lo:hi].unsqueeze(-1))  # -g * softmax, in place
        gz.scatter_add_(-1, y[lo:hi].unsqueeze(-1), g[lo:hi].unsqueeze(-1))  # + g * onehot
        rows = _banned_rows(lo, hi, length, banned, banned_until, gz.device)
        if rows is not None:  # a banned label's onehot gets no gradient (its logit is a constant -inf)
            gz[rows.unsqueeze(1), banned.unsqueeze(0)] = 0.0
        if temperature != 1.0:
            gz = gz.div_(temperature)
        gz = gz.to(mm_dtype)
        if need_h:
            grad_h[lo:hi] = (gz @ w).to(h.dtype)  # [c, H]
        if need_w:
            grad_w += (gz.t() @ h[lo:hi].to(mm_dtype)).to(acc_dtype)  # [V, H]
        if need_b:
            grad_b += gz.sum(0).to(acc_dtype)  # [V]
        del z, gz
    return (None if grad_h is None else grad_h.view(n, length, width),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                     temperature: float = 1.0, banned: torch.Tensor | None = None, banned_until: int = 0,
                     entropy: bool = False, chunk_tokens: int | None = None):
    """log softmax((hidden @ weight.T + bias) / T) gathered at labels, never holding the logits [N, L, V].

    hidden [N, L, H] (position t's state, already aligned with labels [N, L]: the caller drops the last
    position), weight [V, H], bias [V] or None. Returns float32 [N, L] (float64 for float64 inputs),
    differentiable in hidden, weight and bias; with `entropy=True`, ``(logprobs, entropy [N, L])``,
    the entropy without grad. `banned` [K] ids get probability 0 at positions t < banned_until. labels
    must be valid ids in [0, V) everywhere. `chunk_tokens` defaults to `default_chunk_tokens(V)`.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected hidden [N, L, H], weight [V, H] and labels [N, L], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    chunk = default_chunk_tokens(weight.shape[0]) if chunk_tokens is None else int(chunk_tokens)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens!r}")
    if banned is not None:
        banned = banned.reshape(-1).to(device=hidden.device, dtype=torch.long)
    logp, ent = _ChunkedLogprobs.apply(hidden, weight, bias, labels, float(temperature), banned,
                                       int(banned_until), bool(entropy), chunk)
    return (logp, ent) if entropy else logp


# ---- the model's own forward, scoring instead of projecting -------------------------------------


class ScoredHead(nn.Module):
    """Stands in for an output head: forward(hidden [n, L+1, H]) -> log-probs [n, L] of `labels` [n, L]
    (position t predicts token t+1; the last position is dropped). Keeps the entropy when asked."""

    def __init__(self, head: nn.Linear, labels, temperature=1.0, banned=None, banned_until=0, entropy=False,
                 chunk_tokens=None):
        super().__init__()
        self.head = head  # registered, so the model's parameters() is unchanged during the swap
        self.labels, self.temperature, self.banned, self.banned_until = labels, temperature, banned, banned_until
        self.want_entropy, self.chunk_tokens = entropy, chunk_tokens
        self.calls, self.logprobs, self.entropy = 0, None, None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[1] != self.labels.shape[1] + 1 or hidden.shape[0] != self.labels.shape[0]:
            raise ValueError(f"scored_head: the head got hidden states {tuple(hidden.shape)} for labels "
                             f"{tuple(self.labels.shape)}; call the model with logits_to_keep = L + 1")
        out = chunked_logprobs(hidden[:, :-1], self.head.weight, self.head.bias, self.labels.to(hidden.device),
                               self.temperature, self.banned, self.banned_until, self.want_entropy,
                               self.chunk_tokens)
        self.calls += 1
        self.logprobs, self.entropy = (out if self.want_entropy else (out, None))
        return self.logprobs  # [n, L]

    def result(self):
        """The log-probs [n, L] (and the entropy when requested) of the one forward in the context."""
        if self.calls != 1:
            raise RuntimeError(f"scored_head: the model's forward called its output head {self.calls} times, "
                               "expected once; this model cannot score through its head")
        return (self.logprobs, self.entropy) if self.want_entropy else self.logprobs


def _unwrap(model):
    """The innermost module with get_output_embeddings (through DDP's .module, compiled models, ...)."""
    seen = 0
    while not hasattr(model, "get_output_embeddings") and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    return model


def _configs(config) -> list:
    """The config and, for composite models, its text config."""
    found = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        found.append(text)
    return found


def unsupported_reason(model) -> str | None:
    """Why `scored_head` would give wrong log-probs for this model, or None when it is safe."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings (get_output_embeddings)"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear"
    if "forward" in vars(head) or head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return "the output head has hooks or a patched forward, which scoring would bypass"
    for config in _configs(getattr(inner, "config", None) or object()):
        if getattr(config, "model_type", None) in _MODEL_TYPES:
            return f"{config.model_type} edits the logits after the head"
        for name in _SOFTCAPS:
            if getattr(config, name, None) not in (None, 0, 0.0):
                return f"the config soft-caps the logits ({name}={getattr(config, name)!r})"
        for name in _SCALES:
            if getattr(config, name, None) not in (None, 1, 1.0):
                return f"the config scales the logits ({name}={getattr(config, name)!r})"
        unpadded = getattr(config, "unpadded_vocab_size", None)
        if unpadded is not None and unpadded != getattr(config, "vocab_size", unpadded):
            return f"the config truncates the logits (unpadded_vocab_size={unpadded!r})"
    return None


def supports_scored_head(model) -> bool:
    """Whether the model's forward returns its head's output untouched (see the module doc)."""
    return unsupported_reason(model) is None


@contextmanager
def scored_head(model, labels: torch.Tensor, temperature: float = 1.0, banned: torch.Tensor | None = None,
                banned_until: int = 0, entropy: bool = False, chunk_tokens: int | None = None):
    """Within the context, ``model(..., logits_to_keep=L + 1).logits`` is the float32 log-probs [n, L] of
    `labels` [n, L] (the completion ids), computed by `chunked_logprobs`; yields the `ScoredHead`, whose
    ``result()`` gives them (with the entropy when `entropy=True`) and checks the head ran once. The head is
    put back on exit, also when the forward raises. Raises ValueError for a model that does not support it.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"scored_head: {reason}")
    head = _unwrap(model).get_output_embeddings()
    parents = {(id(module), name): (module, name) for _, module in model.named_modules(remove_duplicate=False)
               for name, child in module.named_children() if child is head}.values()
    if not parents:
        raise ValueError("scored_head: the output head is not a submodule of the model")
    scorer = ScoredHead(head, labels, temperature, banned, banned_until, entropy, chunk_tokens)
    try:
        for parent, child_name in parents:
            setattr(parent, child_name, scorer)
        yield scorer
    finally:
        for parent, child_name in parents:
            setattr(parent, child_name, head)

"""The rollout engine: batched, KV-cached sampling of G completions per prompt from a full or nested model.

Choices:
- One lean decode loop over the model's own forward (no `generate()` machinery): left-padded prompts,
  explicit position ids from the attention mask, a preallocated KV cache built for the model as it runs
  (kv_cache.py: a nested model gets a cache of its own K layers; nothing is re-concatenated per token),
  the LM head applied to the last position only; on CPU, one-token steps attend through two batched
  products instead of SDPA's kernel (decode_attention.py). The prefill runs each distinct prompt row once
  (a prompt's G completions are G equal rows) and copies its cache rows and logits to its repeats. Rows
  that have emitted EOS leave the batch once they are a quarter of it (their cache rows are dropped in one
  copy), so a finished row stops costing a full row's forward; a row's tokens do not depend on which other
  rows are still decoding (up to the float rounding of a different batch size in the matrix products:
  log-probs within 1e-6, docs/rollout.md). Both copies need a cache whose layers can select rows
  (kv_cache.selects_rows: attention layers, and the conv and recurrent states of hybrid models' Mamba and
  gated-delta-rule layers); a cache with any other layer prefills every row and keeps its finished rows.
  The steps go through a decoder: `EagerDecoder` (the default), or with `cuda_graphs` decode_graphs.py's
  `GraphDecoder` (transformers' StaticCache, each batch composition's steps replayed from one CUDA graph).
  The loop runs under torch.inference_mode (less per-op bookkeeping than no_grad); its outputs are
  cloned into ordinary tensors so the trainer can use them in autograd. Under autocast (the trainer's bf16
  with float32 weights) it runs under no_grad instead, where autocast casts each trainable weight once per
  call and keeps the copy (torch >= 2.10 keeps none under inference_mode, so every weight was cast at every
  token: on a GPU, reading 4 bytes and writing 2 per parameter on top of the 2 the product reads); the
  copies (2 bytes per parameter) are dropped when generate returns, also so that no later forward that
  needs gradients can meet a copy made without them. Frozen weights (LoRA's base) are never kept. An
  FSDP2-sharded model also decodes under no_grad: FSDP2 all-gathers parameters into buffers it reuses,
  and buffers created under inference_mode cannot be written outside it (the next training forward fails).
- Sampling = temperature, then top-k (off unless asked), then top-p (nucleus), then an inverse-CDF draw:
  the token is the first whose cumulative probability exceeds u * (total mass), with one uniform u per
  row and step. The uniforms [N, L] are drawn up front, before decoding, either from one generator for
  the whole batch or from one generator per prompt (its G rows). With per-prompt generators a prompt's
  completions depend only on its own seed, not on which other prompts share its batch or process: the
  trainer seeds each prompt with (seed, step, position in the step's batch), so 1 process and N processes
  sample the same tokens (up to floating-point differences in the logits); its generators are CPU ones,
  so the uniforms are also the same on CPU and GPU.
  (torch.multinomial draws for all rows from one generator, so a row's sample would depend on its batch.)
  It costs one cumsum + searchsorted over the vocabulary per step instead of torch.multinomial; plain
  sampling (top_p = 1, top_k = 0) takes the cumsum of one softmax, with no sort and no log-softmax over
  the vocabulary (the log-prob of the drawn token is the log of its probability).
- The behaviour log-prob recorded for each generated token is the log-probability under exactly that
  processed distribution (temperature-scaled, truncated, renormalised), i.e. the distribution the token
  was actually drawn from. With top_p = 1 and top_k = 0 (the training default)
  this is log_softmax(logits / T). `logprobs="recompute"` instead recomputes log_softmax(logits / T) with
  a teacher-forced pass of the (nested) model over prompt + completion; docs/rollout.md reports the
  measured difference between the two.
- EOS is suppressed until `min_new_tokens`; with min == max (the paper's 256) every completion has the
  same length. After EOS a row emits padding and its completion mask is 0 (EOS itself counts).
- temperature == 0 is greedy decoding (log-probs then are those of log_softmax(logits)).
- The loop stops once every row has emitted EOS. `all_done` (optional) makes that decision collective:
  under FSDP every forward is a collective, so the trainer passes a function that all-reduces the flag and
  every process keeps decoding (padding only) until all are done; the result is trimmed to where this
  process's own rows finished, so it equals what the process would have produced alone.
"""

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nested_reft.decode_attention import single_query_attention
from nested_reft.decode_graphs import GraphDecoder, graphs_problem
from nested_reft.kv_cache import decode_cache, select_cache_rows, selects_rows
from nested_reft.logprobs import scored_head, supports_scored_head
from nested_reft.nested import skip_layers, unwrap_adapters
from nested_reft.objectives import token_logprobs


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # softmax temperature T; 0 means greedy decoding
    top_p: float = 1.0  # nucleus sampling mass; 1.0 disables it
    top_k: int = 0  # keep only the k most likely tokens; 0 disables it
    max_new_tokens: int = 256  # completion length cap
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens
    logprobs: str = "sampled"  # "sampled": of the distribution sampled from; "recompute": teacher-forced pass

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.logprobs not in ("sampled", "recompute"):
            raise ValueError(f"logprobs must be 'sampled' or 'recompute', got {self.logprobs!r}")


class Rollout(NamedTuple):
    prompt_ids: torch.Tensor  # [B*G, P] left-padded
    prompt_mask: torch.Tensor  # [B*G, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B*G, L] pad after EOS
    completion_mask: torch.Tensor  # [B*G, L] 1 on generated tokens up to and including EOS
    behavior_logprobs: torch.Tensor  # [B*G, L] float32, log eta'(y_l | s_l); 0 where masked
    skip: tuple[int, ...]  # layers bypassed by the behaviour model
    num_prompt_tokens: int  # real prompt tokens over all B*G rows
    num_completion_tokens: int  # generated tokens over all rows (mask sum)
    rollout_s: float  # wall time of prefill + decode (+ recompute)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ids [N, P] and an attention mask [N, P]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {row} is empty")
        ids[row, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [N, V] / temperature in float32, copying no more than once: at T = 1 they are returned as they
    are (x / 1 is x exactly), and a low-precision input is divided in its float32 copy. At a 151,936-token
    vocabulary and 128 rows on CPU the division's copy was a third of a plain sampling step."""
    x = logits.float()
    if temperature == 1.0:
        return x
    return x / temperature if x is logits else x.div_(temperature)


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits [N, V]; returns log-probs [N, V] of the sampling
    distribution (excluded tokens get -inf)."""
    logits = scaled_logits(logits, cfg.temperature) if cfg.temperature > 0 else logits.float()
    if cfg.top_k > 0 and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # mass before this token already exceeds top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first token [N] whose cumulative probability (of probs [N, V]) exceeds the row's uniform [N] in
    [0, 1) times the total mass the cumsum reached; tokens of probability 0 are never drawn."""
    cdf = probs.cumsum(-1)  # [N, V]
    target = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]  # [N, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)


def sample_token(logp: torch.Tensor, greedy: bool, uniform: torch.Tensor | None) -> torch.Tensor:
    """One token per row from log-probs [N, V]: argmax when greedy, else the inverse CDF at the row's
    uniform [N] in [0, 1); returns [N]."""
    if greedy:
        return logp.argmax(-1)
    return inverse_cdf(logp.exp(), uniform)


def sample(logits: torch.Tensor, cfg: SamplingConfig, uniform: torch.Tensor | None):
    """One token per row from logits [N, V] and its log-prob under the distribution sampled from: (tokens
    [N], log-probs [N] float32). Plain sampling (T > 0, top_p = 1, top_k = 0, the training default) takes
    one softmax and its cumsum (no sort, no log-softmax over the vocabulary); the rest goes through
    process_logits. The two agree to float32 rounding (tests/test_rollout.py)."""
    if cfg.temperature > 0 and cfg.top_p >= 1.0 and cfg.top_k == 0:
        probs = torch.softmax(scaled_logits(logits, cfg.temperature), dim=-1)  # [N, V]
        tok = inverse_cdf(probs, uniform)
        return tok, probs.gather(-1, tok[:, None]).squeeze(-1).log()
    logp = process_logits(logits, cfg)  # [N, V]
    tok = sample_token(logp, cfg.temperature == 0, uniform)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def sampling_uniforms(generator, num_prompts: int, num_generations: int, length: int, device) -> torch.Tensor:
    """Uniforms [num_prompts * G, length] for the decode loop, rows prompt-major. `generator`: None (the
    global RNG), one torch.Generator for the batch, or a sequence of one generator per prompt."""
    n = num_prompts * num_generations
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand((n, length), generator=generator, device=gen_device).to(device)
    if len(generator) != num_prompts:
        raise ValueError(f"got {len(generator)} generators for {num_prompts} prompts")
    return torch.cat([torch.rand((num_generations, length), generator=g, device=g.device).to(device)
                      for g in generator])


def eos_tensor(eos_token_id, device) -> torch.Tensor:
    """EOS ids as a 1-D long tensor: from None, one id (0 included), a list of ids, or such a tensor."""
    if eos_token_id is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    if isinstance(eos_token_id, torch.Tensor):
        return eos_token_id.reshape(-1).to(device=device, dtype=torch.long)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers 5.x, `past_key_values` in
    earlier ones (later ones accept it with a FutureWarning until 5.40). Read from the HF model itself,
    through a PEFT wrapper (whose forward takes **kwargs)."""
    forward = unwrap_adapters(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


#: Finished rows (EOS emitted) are dropped from the decode batch once they are this fraction of it: each drop
#: copies the KV cache of the rows that stay, so it is batched rather than done for every finished row.
COMPACT_FRACTION = 0.25


class EagerDecoder:
    """The decode loop's default steps: the preallocated cache of kv_cache.py, read up to its filled part."""

    def __init__(self, model, capacity: int):
        self.model, self.cache, self.kwarg = model, decode_cache(model, capacity), cache_kwarg(model)
        self.drops_rows = selects_rows(self.cache)  # rows can be copied and dropped (kv_cache.select_cache_rows)

    def prefill(self, ids, full_mask, positions) -> torch.Tensor:
        """Logits [N, V] at the last prompt position; ids/positions [N, P], full_mask [N, P + L]. Each distinct
        prompt runs once (a prompt's G completions, or a batch that repeats prompts as TRL's does), and its
        cache rows and logits are copied to the rows that repeat it."""
        first, inverse = self.distinct_rows(ids, full_mask[:, : ids.size(1)])  # [U], [N]
        logits = self.model(input_ids=ids[first], attention_mask=full_mask[first, : ids.size(1)],
                            position_ids=positions[first], use_cache=True, logits_to_keep=1,
                            **{self.kwarg: self.cache}).logits[:, -1]  # [U, V]
        if first.numel() == ids.size(0):
            return logits
        select_cache_rows(self.cache, inverse)  # row i gets the cache row of its prompt's first occurrence
        return logits.index_select(0, inverse)

    def distinct_rows(self, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(first [U]: one row of each distinct (ids, mask) row of [N, P], its first occurrence; inverse [N]:
        the position in `first` of each row's copy). All N rows, in order, when no two rows are equal or a
        cache layer cannot copy rows."""
        n, rows = ids.size(0), torch.arange(ids.size(0), device=ids.device)
        if not self.drops_rows:
            return rows, rows
        _, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], dim=1), dim=0, return_inverse=True)  # [N]
        distinct = int(inverse.max()) + 1
        if distinct == n:
            return rows, rows
        first = ids.new_full((distinct,), n).scatter_reduce_(0, inverse, rows, "amin")  # [U]
        return first, inverse

    def step(self, tok, positions, full_mask, filled: int) -> torch.Tensor:
        """Logits [m, V] after tokens tok [m] at positions [m, 1], attending to the `filled` first positions."""
        return self.model(input_ids=tok[:, None], attention_mask=full_mask[:, :filled], position_ids=positions,
                          use_cache=True, **{self.kwarg: self.cache}).logits[:, -1]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the cache rows `keep` [m']."""
        select_cache_rows(self.cache, keep)


def _decode(decoder, ids, mask, cfg: SamplingConfig, eos: torch.Tensor, pad_id: int, uniforms, all_done=None):
    """The KV-cached loop over `decoder`'s steps (EagerDecoder, or decode_graphs.GraphDecoder). ids/mask
    [N, P], uniforms [N, L] (None when greedy); returns completion ids, mask and sampled log-probs [N, L].
    `all_done(local_done: bool) -> bool`: see the module doc. Rows that have emitted EOS leave the batch
    once they are a quarter of it (see `COMPACT_FRACTION`)."""
    n, p = ids.shape
    length = cfg.max_new_tokens
    full_mask = torch.cat([mask, mask.new_ones(n, length)], dim=1)  # [N, P+L]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, P]
    logits = decoder.prefill(ids, full_mask, positions)  # [N, V]
    tokens = ids.new_full((n, length), pad_id)  # [N, L]
    logps = torch.zeros((n, length), dtype=torch.float32, device=ids.device)  # [N, L]
    rows = torch.arange(n, device=ids.device)  # [m]: the rows still in the batch
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)  # [m]
    next_pos = positions[:, -1:] + 1  # [m, 1]
    end = None  # length at which all of this process's rows were done
    for t in range(length):
        if t < cfg.min_new_tokens and eos.numel():
            logits = logits.index_fill(-1, eos, float("-inf"))
        tok, logp = sample(logits, cfg, None if uniforms is None else uniforms[rows, t])  # [m], [m]
        tok = tok.masked_fill(done, pad_id)
        tokens[rows, t] = tok
        logps[rows, t] = logp.masked_fill(done, 0.0)
        done = done | torch.isin(tok, eos)
        finished_rows = int(done.sum())
        if end is None and finished_rows == rows.numel():
            end = t + 1
        finished = end is not None if all_done is None else all_done(end is not None)  # collective under FSDP
        if t + 1 == length or finished:
            break
        # a pad-only row costs a full one: drop the finished rows (where the cache can) once they are a quarter
        if decoder.drops_rows and COMPACT_FRACTION * rows.numel() <= finished_rows < rows.numel():
            keep = (~done).nonzero().squeeze(1)  # [m']
            rows, tok, done, next_pos, full_mask = rows[keep], tok[keep], done[keep], next_pos[keep], full_mask[keep]
            decoder.select(keep)
        logits = decoder.step(tok, next_pos, full_mask, p + t + 1)  # [m, V]
        next_pos = next_pos + 1
    tokens, logps = tokens[:, : end or t + 1], logps[:, : end or t + 1]
    return tokens, completion_mask(tokens, eos), logps


def _decode_mode(model, device: torch.device):
    """inference_mode (cheaper than no_grad for the many small decode ops, about 15% on CPU), or no_grad for an
    FSDP2 module (see the module doc) and under autocast: autocast keeps its lower-precision copy of each
    weight only outside inference_mode, so there every weight would be cast again at every token."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or torch.is_autocast_enabled(device.type):
        return torch.no_grad()
    return torch.inference_mode()


def completion_mask(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """1 on every token up to and including the first EOS of each row; tokens [N, L] -> [N, L]."""
    is_eos = torch.isin(tokens, eos).long()
    before_or_at_eos = (is_eos.cumsum(-1) - is_eos) == 0
    return before_or_at_eos.long()


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    num_generations: int,
    cfg: SamplingConfig,
    eos_token_id,
    pad_token_id: int,
    skip: Sequence[int] = (),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    all_done=None,
    cuda_graphs: bool = False,
) -> Rollout:
    """Sample `num_generations` completions for each prompt (token-id lists) from the model with the
    layers in `skip` bypassed. Rows are ordered prompt-major: the G completions of a prompt are adjacent.
    `generator`: one for the batch, or one per prompt (then a prompt's samples do not depend on its batch).
    `all_done`: a collective stop decision (FSDP; see the module doc). `cuda_graphs`: replay the one-token
    steps from CUDA graphs (decode_graphs.py; CUDA, full-attention models)."""
    cfg.validate()
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    device = next(model.parameters()).device
    if cuda_graphs and (problem := graphs_problem(model, device)):
        raise ValueError(problem)
    rows = [p for p in prompts for _ in range(num_generations)]
    ids, mask = left_pad(rows, pad_token_id, device)
    eos = eos_tensor(eos_token_id, device)
    greedy = cfg.temperature == 0
    uniforms = None if greedy else sampling_uniforms(generator, len(prompts), num_generations, cfg.max_new_tokens,
                                                     device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with skip_layers(model, skip):
            with _decode_mode(model, device), single_query_attention(model):
                capacity = ids.size(1) + cfg.max_new_tokens
                decoder = (GraphDecoder(model, capacity, cache_kwarg(model)) if cuda_graphs
                           else EagerDecoder(model, capacity))
                decoded = _decode(decoder, ids, mask, cfg, eos, pad_token_id, uniforms, all_done)
                del decoder  # its cache (and graphs) go before the recompute pass
            tokens, cmask, logps = (t.clone() for t in decoded)
            if cfg.logprobs == "recompute":  # no graph: behaviour log-probs are constants of the update
                with torch.no_grad():
                    logps = sequence_logprobs(model, ids, mask, tokens, cmask, cfg.temperature,
                                              eos_token_id=eos, min_new_tokens=cfg.min_new_tokens)
    finally:
        model.train(was_training)
        if torch.is_autocast_enabled(device.type):  # the weights' copies (made without grad) go with the call,
            torch.clear_autocast_cache()            # not at the exit of an autocast the caller may keep open
    elapsed = time.perf_counter() - start
    logps = logps * cmask
    return Rollout(ids, mask, tokens, cmask, logps, tuple(sorted(skip)), int(mask.sum()), int(cmask.sum()), elapsed)


def completion_texts(tokenizer, rollout: Rollout) -> list[str]:
    """Each row's completion as text, decoded from its masked tokens only (up to and including EOS): the
    padding after EOS never reaches the text (pad or id 0 can be an ordinary token such as "!")."""
    rows = zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist())
    return [tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True) for ids, mask in rows]


def sequence_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
    batch_size: int | None = None, eos_token_id=None, min_new_tokens: int = 0, entropy: bool = False,
):
    """Teacher-forced log pi(y_l | s_l) of the completion tokens, [N, L] float32, with the same
    temperature scaling as sampling (T = 0, greedy, scores with T = 1) and, given `eos_token_id`, the
    same EOS suppression before `min_new_tokens`. Runs with grad if grad is enabled (the trainer's
    policy pass). `entropy=True` also returns the entropy [N, L] of each scored distribution.
    Where the model allows it (logprobs.supports_scored_head) the head and the log-softmax run fused,
    chunk by chunk, inside the model's own forward: no [N, L, V] logits, in the forward or the backward."""
    banned = eos_tensor(eos_token_id, prompt_ids.device) if min_new_tokens > 0 else None
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P+L]
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    length = completion_ids.size(1)
    step = batch_size or ids.size(0)
    scored = supports_scored_head(model)
    chunks = []
    for i in range(0, ids.size(0), step):
        labels = completion_ids[i:i + step]  # [n, L]
        kwargs = dict(input_ids=ids[i:i + step], attention_mask=mask[i:i + step], position_ids=positions[i:i + step],
                      use_cache=False, logits_to_keep=length + 1)
        if scored:
            with scored_head(model, labels, temperature or 1.0, banned, min_new_tokens, entropy=entropy) as scorer:
                model(**kwargs)
            chunks.append(scorer.result())
        else:
            logits = model(**kwargs).logits[:, :-1]  # [n, L, V]: position t predicts t+1
            chunks.append(token_logprobs(logits, labels, temperature or 1.0, banned, min_new_tokens, entropy=entropy))
    if not entropy:
        return torch.cat(chunks, dim=0)
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

"""The Nested-ReFT RL loop (Algorithm 1, step 2): rollouts from a freshly drawn nested model every step,
verifiable rewards, group advantages, importance weights h_m, and a GRPO update of the full policy.

Choices:
- Everything that can fail is checked before any work: the config, the model (loads, has a layer list,
  U fits the valid layers), the tokenizer, the data set. Nothing is written until all of it passed.
- Determinism by construction: the prompts of step s and its skip set are pure functions of (seed, s)
  (data order = one seeded permutation per epoch; skip set from a generator seeded with (seed, s)), and
  each prompt is sampled from its own generator seeded with (seed, s, its position in the step's batch).
  A resumed run therefore repeats exactly the uninterrupted run's prompts, skip sets and rollouts, every
  process draws the same skip set, and a prompt's rollouts do not depend on how many processes share
  the step (1 process and N processes train on the same samples; tests/test_distributed.py).
- pi_old (the full-depth policy at rollout time) is scored by a teacher-forced pass in every variant,
  the baseline included, so rho, h and the log-ratio metrics exist for all and the variants pay the same.
- Loss normalisers (token counts for bnpo, sequence counts for grpo/dr_grpo) are global over the whole
  step's batch (all micro-batches, all processes), so gradient accumulation and data parallelism give
  the gradient of the full-batch loss.
- A non-finite loss or gradient skips the update (counted in `skipped_updates`).
- Several processes (`accelerate launch` / `torchrun`, DDP or FSDP2; docs/distributed.md): process r takes
  the prompts at positions r, r + world, ... of the step's batch with all their G completions (group
  advantages stay exact); metrics are reduced over processes; only process 0 writes files. Under FSDP2
  rollouts run the sharded module (a skipped layer's unit is simply not called); every forward is a
  collective, so the decode loop stops only when all processes are done, and gradients are
  reduce-scattered after every micro-batch (no `no_sync`: that would keep unsharded gradients). The
  process-group pieces are in distributed.py, checkpoints and resume in checkpoint.py.
- LoRA (`lora_r` > 0, peft): the loaded model is wrapped before the optimizer is built, and the optimizer
  gets only the adapters' parameters. Rollouts, pi_old, the policy pass and the Block Influence meter all
  run the wrapped model (its decoder layers are the base model's modules with adapters injected, so
  `skip_layers` nests it as it nests any model). The KL reference for beta > 0 is the same model inside
  peft's `disable_adapter()`, i.e. the base: no second copy is loaded. LoRA under FSDP is refused.
"""

import math
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nested_reft.batching import MicroBatch, loss_scale, micro_batches, micro_rows
from nested_reft.checkpoint import (TrainingError, prepare_output, restart_hint, save_checkpoint, save_final_model,
                                   write_summary, written_or_removed)
from nested_reft.compiled import check_compiler, compile_layers, using_layers
from nested_reft.config import ConfigError, TrainConfig, output_dir_problems, raise_if
from nested_reft.decode_graphs import graphs_problem
from nested_reft.data import DataError, encode_prompt, load_examples
from nested_reft.distributed import (collective_failures, fsdp_requested, full_tensor, gather_rows, gather_tensor,
                                     global_sum, make_accelerator, shard_model, use_fsdp)
from nested_reft.importance import measuring
from nested_reft.layer_skip import check_fixed_skip_set, check_skip_config, skip_set_at
from nested_reft.logprobs import supports_scored_head
from nested_reft.metrics import (Means, MetricsLog, accumulate_run, clipped_completions, make_tracker, nan_reduce,
                                 reward_stats, run_offpolicy_means)
from nested_reft.models import (apply_lora, context_length, disable_dropout, load_model_and_tokenizer,
                                merged_adapters, require_peft, trainable_parameters)
from nested_reft.models import eos_ids as model_eos_ids
from nested_reft.nested import (enable_activation_checkpointing, find_layers, nesting_problem, num_layers,
                                unwrap_adapters)
from nested_reft.objectives import (combine_offpolicy, finish_offpolicy, group_advantages, importance_weights,
                                    offpolicy_sums, policy_loss)
from nested_reft.rewards import math_reward
from nested_reft.rollout import Rollout, SamplingConfig, completion_texts, generate, sequence_logprobs


class Prompt(NamedTuple):
    ids: list[int]  # prompt token ids (template applied)
    answer: str  # reference answer
    alternatives: list[str]  # other accepted answers (Minerva)


@dataclass
class Run:
    """Everything a training run holds once validated and loaded."""

    cfg: TrainConfig
    model: torch.nn.Module  # the policy (wrapped by accelerate when distributed)
    tokenizer: object
    prompts: list[Prompt]
    ref_model: torch.nn.Module | None
    accelerator: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    num_layers: int
    out: Path
    fsdp: bool = False  # model (and reference) sharded with FSDP2's fully_shard
    compiled: torch.nn.ModuleList | None = None  # --compile: the decoder layers' compiled wrappers (compiled.py)
    profile: list[float] | None = None  # importance skip policy: Block Influence per layer the next draw uses
    dirty: bool = False  # the optimizer stepped in this step and its bookkeeping is not done yet


# ---- setup ------------------------------------------------------------------------------------


def load_prompts(cfg: TrainConfig, tokenizer) -> list[Prompt]:
    try:
        examples = load_examples(cfg.dataset, cfg.split, cfg.data_dir, cfg.limit)
    except DataError as exc:
        raise ConfigError(f"dataset={cfg.dataset!r}: {exc}") from None
    if not examples:
        raise ConfigError(f"dataset={cfg.dataset!r} split={cfg.split!r} has no examples")
    if len(examples) < cfg.batch_size:
        warnings.warn(f"dataset={cfg.dataset!r} has {len(examples)} examples, fewer than batch_size="
                      f"{cfg.batch_size}: every step repeats prompts", stacklevel=2)
    return [Prompt(encode_prompt(tokenizer, ex.problem, cfg.template), ex.answer,
                   list((ex.meta or {}).get("answer_alternatives") or [])) for ex in examples]


def check_model(cfg: TrainConfig, model) -> int:
    """N for the model; raises ConfigError when the model cannot be nested as configured."""
    try:
        find_layers(model)
        n = num_layers(model)
        check_skip_config(n, cfg.skip_ratio, cfg.border)
        if cfg.skip_ratio > 0 and (problem := nesting_problem(model)):
            raise ValueError(problem)
        if cfg.skip_policy == "fixed":
            check_fixed_skip_set(n, cfg.skip_ratio, cfg.border, cfg.skip_layers)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r}: {exc}") from None
    return n


def check_context(cfg: TrainConfig, model, prompts: list[Prompt]) -> None:
    """The longest prompt + max_new_tokens must fit the model's max_position_embeddings."""
    context = context_length(model)
    longest = max(len(p.ids) for p in prompts)
    if context is not None and longest + cfg.max_new_tokens > context:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens}: the longest prompt ({longest} tokens) + completion "
                          f"does not fit the model's max_position_embeddings={context}; lower max_new_tokens to "
                          f"{context - longest} or less")


def check_lora_setup(cfg: TrainConfig) -> None:
    """LoRA's checks that need the environment, not the model: peft installed, no FSDP launch."""
    if cfg.lora_r <= 0:
        return
    if fsdp_requested():
        raise ConfigError(f"lora_r={cfg.lora_r}: LoRA with FSDP is not supported (the adapters are small: launch "
                          "with DDP, e.g. configs/accelerate/ddp-multigpu.yaml, or drop --lora-r to shard a full "
                          "fine-tuning run)")
    require_peft(f"lora_r={cfg.lora_r}")


def setup(cfg: TrainConfig) -> Run:
    """Validate everything, load model/data, build optimizer and scheduler. Writes nothing."""
    cfg.validate()
    raise_if(output_dir_problems(Path(cfg.output_dir)))
    if cfg.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError('report_to=tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"')
    check_lora_setup(cfg)
    accelerator = make_accelerator(cfg.device, cfg.bf16, cfg.collective_timeout_s)
    fsdp = use_fsdp()
    if cfg.compile and fsdp:
        raise ConfigError("compile=true is not supported under FSDP (it shards each decoder layer); drop --compile")
    if cfg.compile and (problem := check_compiler(accelerator.device.type)):
        raise ConfigError(problem)
    if cfg.cuda_graphs and fsdp:
        raise ConfigError("cuda_graphs=true is not supported under FSDP (every forward is a collective); "
                          "drop --cuda-graphs")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    n = check_model(cfg, model)
    if cfg.cuda_graphs and (problem := graphs_problem(model, accelerator.device)):
        raise ConfigError(problem)
    prompts = load_prompts(cfg, tokenizer)
    check_context(cfg, model, prompts)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.lora_r > 0:  # the reference for beta > 0 is this model with its adapters disabled (reference_logprobs)
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.seed,
                           cfg.model)
    ref_model = None
    if cfg.beta > 0 and cfg.lora_r == 0:
        ref_model, _ = load_model_and_tokenizer(cfg.model)
        ref_model.requires_grad_(False).eval().to(accelerator.device)
    for m in (model, ref_model):
        if m is not None and cfg.disable_dropout:
            disable_dropout(m)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    if fsdp:
        shard_model(model, accelerator.device)
        if ref_model is not None:
            shard_model(ref_model, accelerator.device)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = make_scheduler(cfg, optimizer)
    if not fsdp:  # accelerate's own FSDP2 preparation is GPU-only; the sharded model needs no wrapper
        model, optimizer = accelerator.prepare(model, optimizer)
    compiled = compile_layers(accelerator.unwrap_model(model)) if cfg.compile else None
    return Run(cfg, model, tokenizer, prompts, ref_model, accelerator, optimizer, scheduler, n, Path(cfg.output_dir),
               fsdp, compiled)


def make_scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    warmup = int(math.ceil(cfg.warmup_ratio * cfg.steps))
    # HF's "constant" ignores num_warmup_steps; ours means constant after the warm-up
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps)


# ---- what each step uses: pure functions of (seed, step) ----------------------------------------


#: torch warns when the schedule moves before the optimizer's first step: a skipped (non-finite) first update.
SKIPPED_FIRST_UPDATE = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"


def advance(scheduler) -> None:
    """One step of the learning-rate schedule, which follows the steps whether or not their update was
    applied (without torch's warning for a skipped first update)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(SKIPPED_FIRST_UPDATE))
        scheduler.step()


def step_prompt_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the step's prompts: consecutive slices of one seeded permutation per epoch."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def step_skip_set(cfg: TrainConfig, n: int, step: int, profile=None) -> tuple[int, ...]:
    """The skip set of step `step` (0-based): the same on every process and after a resume (the
    importance policy's profile is reduced over processes and saved in checkpoints)."""
    return skip_set_at(n, cfg.skip_ratio, cfg.border, cfg.seed, step, cfg.skip_policy, profile,
                       cfg.skip_temperature, cfg.skip_layers)


def reduce_profile(run: Run, meter) -> list[float]:
    """Block Influence per layer from a meter's sums and counts added over processes."""
    rows = gather_rows(run.accelerator, meter.sums.tolist() + meter.counts.tolist()).sum(0)  # [2N]
    n = meter.sums.numel()
    return (rows[:n] / rows[n:].clamp(min=1)).tolist()


@torch.no_grad()
def initial_profile(run: Run, prompts: list[Prompt]) -> list[float]:
    """The first profile, before any update: one full-depth forward pass over the step's prompt tokens."""
    policy = run.accelerator.unwrap_model(run.model)
    with measuring(policy, True) as meter, run.accelerator.autocast():
        for p in prompts:
            policy(input_ids=torch.tensor([p.ids], device=run.accelerator.device), use_cache=False)
    return reduce_profile(run, meter)


def sampling_generators(cfg: TrainConfig, step: int, positions: list[int]) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded by (seed, step, position of the prompt in the step's batch)."""
    return [torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 100_003 + k + 1) for k in positions]


def sampling_config(cfg: TrainConfig) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                          logprobs=cfg.logprobs)


# ---- one RL step --------------------------------------------------------------------------------


def local_positions(run: Run) -> list[int]:
    """Positions in the step's batch that this process handles: rank, rank + world, ..."""
    acc = run.accelerator
    return list(range(acc.process_index, run.cfg.batch_size, acc.num_processes))


def local_prompts(run: Run, step: int) -> list[Prompt]:
    """This process's share of the step's prompts (whole prompts: a prompt's G completions stay here)."""
    idx = step_prompt_indices(len(run.prompts), run.cfg.batch_size, step, run.cfg.seed)
    return [run.prompts[idx[k]] for k in local_positions(run)]


def do_rollouts(run: Run, prompts: list[Prompt], skip, step: int) -> Rollout:
    """Generate G completions per prompt (`local_prompts(run, step)`) with the nested model, in
    rollout_batch_size chunks; each prompt samples from its own generator (see sampling_generators)."""
    cfg, acc = run.cfg, run.accelerator
    policy = unwrap_adapters(acc.unwrap_model(run.model))  # LoRA: the HF model, its layers carrying the adapters
    gens = sampling_generators(cfg, step, local_positions(run))
    if len(gens) != len(prompts):
        raise ValueError(f"do_rollouts expects this process's {len(gens)} prompts, got {len(prompts)}")
    eos = eos_ids(run)
    all_done = (lambda done: global_sum(acc, 0.0 if done else 1.0) == 0) if run.fsdp else None
    parts = []
    with acc.autocast(), merged_adapters(policy) if cfg.lora_merge_rollouts else nullcontext():
        for i in range(0, len(prompts), cfg.rollout_batch_size):
            chunk = [p.ids for p in prompts[i:i + cfg.rollout_batch_size]]
            parts.append(generate(policy, chunk, cfg.num_generations, sampling_config(cfg), eos,
                                  run.tokenizer.pad_token_id, skip=skip,
                                  generator=gens[i:i + cfg.rollout_batch_size], all_done=all_done,
                                  cuda_graphs=cfg.cuda_graphs))
    return merge_rollouts(parts, run.tokenizer.pad_token_id)


def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Concatenate rollouts row-wise, left-padding prompts and right-padding completions."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.prompt_ids.size(1) for r in parts)
    length = max(r.completion_ids.size(1) for r in parts)

    def pad(t, width, value, left):
        extra = width - t.size(1)
        if extra == 0:
            return t
        filler = t.new_full((t.size(0), extra), value)
        return torch.cat([filler, t] if left else [t, filler], dim=1)

    return Rollout(
        torch.cat([pad(r.prompt_ids, p, pad_id, True) for r in parts]),
        torch.cat([pad(r.prompt_mask, p, 0, True) for r in parts]),
        torch.cat([pad(r.completion_ids, length, pad_id, False) for r in parts]),
        torch.cat([pad(r.completion_mask, length, 0, False) for r in parts]),
        torch.cat([pad(r.behavior_logprobs, length, 0.0, False) for r in parts]),
        parts[0].skip, sum(r.num_prompt_tokens for r in parts), sum(r.num_completion_tokens for r in parts),
        sum(r.rollout_s for r in parts))


def score(run: Run, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
    """Rewards [B*G] of the decoded completions against the references."""
    g = run.cfg.num_generations
    texts = completion_texts(run.tokenizer, rollout)
    answers = [p.answer for p in prompts for _ in range(g)]
    alts = [p.alternatives for p in prompts for _ in range(g)]
    return torch.tensor(math_reward(texts, answers, alts), dtype=torch.float32)


def eos_ids(run: Run) -> list[int]:
    """The EOS id(s) the sampler stops at (and suppresses before min_new_tokens)."""
    return model_eos_ids(run.accelerator.unwrap_model(run.model), run.tokenizer)


def full_logprobs(run: Run, model, mb: MicroBatch, entropy=False):
    """Teacher-forced full-depth log-probs [n, L'] of a micro-batch's completions under `model`, scored
    on the distribution the sampler used (temperature, EOS suppressed before min_new_tokens); with
    `entropy=True`, (log-probs, entropies)."""
    return sequence_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                             run.cfg.temperature, None, eos_ids(run), run.cfg.min_new_tokens, entropy=entropy)


def batch_logprobs(run: Run, model, rollout: Rollout, size: int) -> torch.Tensor:
    """full_logprobs of the whole rollout [B*G, L] (0 on padding), in micro-batches of `size` rows' tokens."""
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    for mb in micro_batches(rollout, size, pack=not run.fsdp, logits_bound=not supports_scored_head(model)):
        out[mb.index, : mb.completion_ids.size(1)] = full_logprobs(run, model, mb).float()
    return out


def reference_logprobs(run: Run, rollout: Rollout, size: int) -> torch.Tensor | None:
    """The frozen reference's log-probs [B*G, L] for the KL term (None when beta = 0): the reference model,
    or with LoRA the policy itself with its adapters disabled (the base model: no second copy)."""
    if run.cfg.beta == 0:
        return None
    if run.ref_model is not None:
        return batch_logprobs(run, run.ref_model, rollout, size)
    policy = run.accelerator.unwrap_model(run.model)
    with policy.disable_adapter():
        return batch_logprobs(run, policy, rollout, size)


class Update(NamedTuple):
    loss: float  # the step's policy loss (mean over iterations), summed over micro-batches and processes
    grad_norm: float  # before clipping, of the last iteration
    applied: bool  # every iteration's optimizer step was taken (loss and gradient finite)
    means: Means  # token-weighted metrics of every micro-batch (clip fractions, entropy, kl)
    targets: torch.Tensor  # [B*G, L] pi_old's log-probs (the first iteration's forward when not given)


def update(run: Run, rollout: Rollout, advantages, old_lp, ref_lp, meter=None) -> Update:
    """num_iterations optimizer updates on one rollout batch. old_lp [B*G, L] is pi_old's log-probs, or
    None when num_iterations == 1: then pi_old is the policy itself before this update, and each
    micro-batch's own forward gives its log-probs (detached), which saves a full forward pass. An open
    InfluenceMeter `meter` measures Block Influence over the completion tokens of the first iteration."""
    cfg, acc = run.cfg, run.accelerator
    rows = cfg.micro_batch_size * cfg.num_generations
    world = acc.num_processes
    total_tokens = global_sum(acc, rollout.completion_mask.sum())
    total_rows = global_sum(acc, rollout.completion_ids.size(0))
    losses, applied_all, norm, means = [], True, 0.0, Means()
    batches = micro_batches(rollout, rows, pack=not run.fsdp, logits_bound=not supports_scored_head(run.model))
    targets = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    for it in range(cfg.num_iterations):
        for k, mb in enumerate(batches):
            idx, mask = mb.index, mb.completion_mask  # [n], [n, L']
            rows_of = partial(micro_rows, mb)
            if meter is not None:  # hidden states are [n, P'+L']: count the completion positions, first pass only
                meter.set_mask(torch.cat([torch.zeros_like(mb.prompt_mask), mask * (it == 0)], dim=1))
            sync = run.fsdp or k == len(batches) - 1  # FSDP: reduce-scatter every micro-batch
            with (nullcontext() if sync else acc.no_sync(run.model)), acc.autocast():
                lp, entropy = full_logprobs(run, run.model, mb, entropy=True)  # [n, L'], with grad
                target = lp.detach() if old_lp is None else rows_of(old_lp)
                h, _ = importance_weights(target, rows_of(rollout.behavior_logprobs), mask, cfg.mitigation, cfg.lam,
                                          cfg.is_level, cap=cfg.is_cap,
                                          cap_low=cfg.is_cap_low)  # row-local: the same as on the whole batch
                loss, extra = policy_loss(lp, rows_of(old_lp), advantages[idx], h, mask, cfg.loss_type,
                                          cfg.max_new_tokens, cfg.epsilon, None, rows_of(ref_lp), cfg.beta)
                scaled = loss * loss_scale(cfg.loss_type, mask, total_tokens, total_rows)
                acc.backward(scaled * world)  # DDP/FSDP average over processes; undo it to get the global sum
            losses.append(scaled.detach())
            tokens = float(mask.sum())
            means.add_all(extra, tokens, ("clip_frac", "clip_frac_low", "clip_frac_high", "kl"))
            means.add("entropy", float((entropy * mask).sum()) / max(tokens, 1.0), tokens)
            if it == 0:
                targets[idx, : mask.size(1)] = target.float()
        norm, applied = finish_update(run)
        applied_all = applied_all and applied
    loss = global_sum(acc, torch.stack(losses).sum()) / cfg.num_iterations
    return Update(loss, norm, applied_all, means, targets)


def finish_update(run: Run) -> tuple[float, bool]:
    """Clip, then step only if loss and gradient are finite on every process; always zero the grads.
    From the first optimizer step on, the run is `dirty` until the step's bookkeeping is done."""
    cfg, acc = run.cfg, run.accelerator
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = acc.clip_grad_norm_(run.model.parameters(), max_norm)
    norm = float(full_tensor(norm)) if norm is not None else 0.0
    bad = global_sum(acc, 0.0 if math.isfinite(norm) else 1.0)
    if bad == 0:
        run.dirty = True
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, bad == 0


def rl_step(run: Run, step: int) -> dict:
    """Algorithm 1, lines 7-15, for step `step` (0-based); returns the metrics line."""
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    prompts = local_prompts(run, step)
    if cfg.skip_policy == "importance" and run.profile is None:
        run.profile = initial_profile(run, prompts)
    profile = run.profile
    skip = step_skip_set(cfg, run.num_layers, step, profile)
    rollout = do_rollouts(run, prompts, skip, step)
    rewards = score(run, prompts, rollout)
    advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards).to(acc.device)
    t1 = time.perf_counter()
    rows, policy = cfg.micro_batch_size * cfg.num_generations, acc.unwrap_model(run.model)
    with using_layers(policy, run.compiled):  # --compile: the teacher-forced passes only
        with acc.autocast(), torch.no_grad():  # pi_old is needed apart from the update only when it is reused
            old_lp = None if cfg.num_iterations == 1 else batch_logprobs(run, policy, rollout, rows)
            ref_lp = reference_logprobs(run, rollout, rows)
        run.model.train()
        measure = cfg.skip_policy == "importance" and (step + 1) % cfg.profile_every == 0
        with measuring(policy, measure) as meter:
            upd = update(run, rollout, advantages, old_lp, ref_lp, meter)
    if meter is not None:
        run.profile = reduce_profile(run, meter)  # what the next step's draw uses
    advance(run.scheduler)
    t2 = time.perf_counter()
    _, hm = importance_weights(upd.targets, rollout.behavior_logprobs, rollout.completion_mask, cfg.mitigation,
                               cfg.lam, cfg.is_level, cap=cfg.is_cap, cap_low=cfg.is_cap_low)
    offp = offpolicy_sums(upd.targets, rollout.behavior_logprobs, rollout.completion_mask, cfg.is_cap)
    metrics = step_metrics(run, step, skip, rewards, rollout, hm, upd, rollout_s=rollout.rollout_s,
                           update_s=t2 - t1, step_s=t2 - t0, offpolicy=offp)
    if profile is not None:
        metrics["layer_profile"] = profile  # the Block Influence this step's skip set was drawn from
    return metrics


def step_metrics(run, step, skip, rewards, rollout, hm, upd: Update, rollout_s, update_s, step_s,
                 offpolicy=None) -> dict:
    """The metrics.jsonl line of one step, reduced over processes: sums, min/max, and means weighted by
    what they average over (IS units for the h metrics, completion tokens for the update's), so that N
    processes report what one process would for the same batch (metrics.py). `offpolicy` (this process's
    OffPolicySums) adds the off-policy diagnostics, finished from the pieces summed over processes."""
    cfg, acc = run.cfg, run.accelerator
    clipped = clipped_completions(rollout.completion_ids, rollout.completion_mask, eos_ids(run), cfg.max_new_tokens)
    local = [rollout.num_completion_tokens, rollout.num_prompt_tokens, rollout.completion_ids.size(0), clipped,
             rollout_s, hm["num_units"], hm["h_min"] if hm["num_units"] else math.inf,
             hm["h_max"] if hm["num_units"] else -math.inf,
             upd.means.local("clip_frac_low"), upd.means.local("clip_frac_high")]
    rows = gather_rows(acc, local)  # [world, 10]
    gen_tokens, prompt_tokens, seqs, clipped = (float(rows[:, i].sum()) for i in range(4))
    upd.means.add_all(hm, hm["num_units"], ("h_mean", "h_truncated_frac", "h_capped_frac", "h_masked_frac",
                                            "log_ratio_mean"))
    means = upd.means.reduce(acc)
    offp = {} if offpolicy is None else finish_offpolicy(combine_offpolicy(gather_rows(acc, list(offpolicy))))
    units = float(rows[:, 5].sum())
    tokens = prompt_tokens + gen_tokens
    rollout_s = float(rows[:, 4].max())
    rs = reward_stats(gather_tensor(acc, rewards), cfg.num_generations)
    return {
        "step": step + 1,
        **rs,
        "loss": upd.loss if math.isfinite(upd.loss) else None,
        "skip_set": list(skip),
        "num_skipped": len(skip),
        "h_mean": means["h_mean"] if units else 0.0,
        "h_min": float(rows[:, 6].min()) if units else 0.0,
        "h_max": float(rows[:, 7].max()) if units else 0.0,
        "h_truncated_frac": means["h_truncated_frac"] if units else 0.0,
        "h_capped_frac": means["h_capped_frac"] if units else 0.0,
        "h_masked_frac": means["h_masked_frac"] if units else 0.0,
        "log_ratio_mean": means["log_ratio_mean"] if units else 0.0,
        "sampling/importance_sampling_ratio/min": float(rows[:, 6].min()) if units else 0.0,
        "sampling/importance_sampling_ratio/mean": means["h_mean"] if units else 0.0,
        "sampling/importance_sampling_ratio/max": float(rows[:, 7].max()) if units else 0.0,
        **offp,
        "tokens_generated": int(gen_tokens),
        "tokens_processed": int(tokens),
        "completion_len_mean": gen_tokens / seqs,
        "completions/mean_length": gen_tokens / seqs,
        "completions/clipped_ratio": clipped / seqs,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "rollout_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": upd.grad_norm if math.isfinite(upd.grad_norm) else None,
        "skipped_update": not upd.applied,
        "entropy": means.get("entropy"),
        "clip_frac": means.get("clip_frac"),
        "clip_ratio/low_mean": means.get("clip_frac_low"),
        "clip_ratio/high_mean": means.get("clip_frac_high"),
        "clip_ratio/region_mean": means.get("clip_frac"),
        "clip_ratio/low_min": nan_reduce(rows[:, 8], torch.min),
        "clip_ratio/high_max": nan_reduce(rows[:, 9], torch.max),
        **({"kl": means.get("kl")} if cfg.beta > 0 else {}),
    }


# ---- the loop -----------------------------------------------------------------------------------


class Loop:
    """One run's RL stage, one step at a time: `train` runs a Loop to the end, the sweep's lockstep mode
    interleaves several. Opening it creates, restarts or resumes the run directory (checkpoint.py).
    runtime_s is the stage's wall time: every step with its logging and checkpoints, and the final save.
    A checkpoint carries the runtime up to the start of its own save (the step itself included), so a
    resumed run's total misses only the save it resumed from."""

    def __init__(self, run: Run):
        self.run = run
        self.start, self.state, kept = prepare_output(run)
        run.profile = self.state.get("layer_profile")
        main = run.accelerator.is_main_process
        self.metrics_path = run.out / "metrics.jsonl"
        with written_or_removed(None, f"writing {self.metrics_path}"):
            self.log = MetricsLog(self.metrics_path, main, kept)
        self.tracker = make_tracker(run.cfg, run.out, main)

    def step(self, step: int) -> dict:
        """RL step `step` (0-based): update, log, and checkpoint when due; returns its metrics."""
        run, cfg, t0 = self.run, self.run.cfg, time.perf_counter()
        metrics = rl_step(run, step)
        accumulate_run(self.state, metrics)
        self.state["layer_profile"] = run.profile
        with written_or_removed(None, f"writing {self.metrics_path}"):  # a torn line is dropped on resume
            self.log.write(metrics)
        if self.tracker:
            self.tracker(metrics, step + 1)
        self.state["runtime_s"] += time.perf_counter() - t0
        run.dirty = False  # weights, optimizer, scheduler and totals all describe step + 1 now
        self.check_diverged(step)
        if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.steps:
            t1 = time.perf_counter()
            save_checkpoint(run, step + 1, self.state)
            self.state["runtime_s"] += time.perf_counter() - t1
        return metrics

    def check_diverged(self, step: int) -> None:
        k = self.state["consecutive_skipped"]
        if k >= self.run.cfg.max_skipped_updates:
            raise TrainingError(
                f"{k} consecutive updates were skipped (non-finite loss or gradient), the last at step {step + 1}: "
                f"the run has most likely diverged (lower lr?); {restart_hint(self.run.out)} or raise "
                "max_skipped_updates")

    def finish(self) -> dict:
        """The last checkpoint, the final model and the summary."""
        t0 = time.perf_counter()
        save_checkpoint(self.run, self.run.cfg.steps, self.state)
        save_final_model(self.run)
        self.state["runtime_s"] += time.perf_counter() - t0
        summary = make_summary(self.run, self.state)
        write_summary(self.run, summary)
        return summary


class DeferredInterrupt:
    """Ctrl-C (SIGINT) while the run is `dirty` (an optimizer step of the current step is done, its
    bookkeeping is not) is held until the step ends; otherwise it interrupts at once. A second Ctrl-C
    always interrupts at once. Installed only on the main thread of a single-process run."""

    def __init__(self, run: Run):
        self.run, self.pending, self.old = run, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and self.run.accelerator.num_processes == 1:
            self.old = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False

    def handle(self, signum, frame):
        if self.run.dirty and not self.pending:
            self.pending = True
            print("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again: stop now, no checkpoint)",
                  file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt


def train(cfg: TrainConfig, run: Run | None = None) -> dict:
    """Run the RL stage; returns the summary (also written to summary.json). With several processes, a
    dead or stalled peer makes every other process raise CollectiveError (after at most
    collective_timeout_s) instead of hanging."""
    run = run or setup(cfg)
    with collective_failures(run.accelerator, cfg.collective_timeout_s):
        return _train(run)


def _train(run: Run) -> dict:
    cfg, acc = run.cfg, run.accelerator
    loop = Loop(run)
    bar = _progress(cfg, acc, loop.start)
    try:
        with DeferredInterrupt(run) as interrupt:
            for step in range(loop.start, cfg.steps):
                metrics = loop.step(step)
                if bar:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", skip=len(metrics["skip_set"]))
                if interrupt.pending:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        save_interrupted(run, loop.state)
        raise
    finally:
        if bar:
            bar.close()
    return loop.finish()


def save_interrupted(run: Run, state: dict) -> None:
    """After Ctrl-C: a checkpoint of the last finished step, when the weights are exactly that step's."""
    acc, done = run.accelerator, len(state["rewards"])  # steps finished, resumed ones included
    if acc.num_processes > 1 or run.dirty:  # processes stopped in different collectives / weights mid-step
        if acc.is_main_process:
            why = "several processes" if acc.num_processes > 1 else "stopped inside an update"
            print(f"\ninterrupted ({why}): no checkpoint written; {restart_hint(run.out)}",
                  file=sys.stderr, flush=True)
        return
    if acc.is_main_process:
        print(f"\ninterrupted: saving a checkpoint of step {done} to resume from", file=sys.stderr, flush=True)
    save_checkpoint(run, done, state)


def _progress(cfg: TrainConfig, acc, start: int):
    if not (cfg.progress and acc.is_main_process):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="RL steps", unit="step", dynamic_ncols=True)


def make_summary(run: Run, state: dict) -> dict:
    """summary.json: totals of the run (docs/training.md)."""
    acc, cfg = run.accelerator, run.cfg
    rewards = state["rewards"]
    k = max(1, len(rewards) // 10)  # first and final reward: means over a tenth of the steps (one step is noisy)
    return {
        "steps": cfg.steps,
        "runtime_s": state["runtime_s"],
        "step_time_s": state.get("step_time_s", 0.0),
        "tokens_processed": state["tokens_processed"],
        "tokens_generated": state["tokens_generated"],
        "token_speed": state["tokens_processed"] / max(state["runtime_s"], 1e-9),
        "rollout_tokens_per_s": state["tokens_generated"] / max(state["rollout_s"], 1e-9),
        "rollout_s": state["rollout_s"],
        "first_reward": sum(rewards[:k]) / len(rewards[:k]) if rewards else None,
        "final_reward": sum(rewards[-k:]) / len(rewards[-k:]) if rewards else None,
        "skipped_updates": state["skipped_updates"],
        **run_offpolicy_means(state),
        "skip_ratio": cfg.skip_ratio, "border": cfg.border, "mitigation": cfg.mitigation,
        "skip_policy": cfg.skip_policy,
        "num_layers": run.num_layers, "num_processes": acc.num_processes, "fsdp": run.fsdp,
        "lora_r": cfg.lora_r,
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(acc.unwrap_model(run.model))),
        "final_checkpoint": str(run.out / "final"),
        **({"final_merged": str(run.out / "final" / "merged")} if cfg.merge_lora else {}),
    }

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
- A non-finite loss or gradient skips the update (counted in `skipped_updates`); weights are checked to
  be finite before every checkpoint. Checkpoints are written to a temporary directory, then renamed.
  Ctrl-C saves a checkpoint of the last finished step; SIGKILL loses at most the steps since the last one.
- Several processes (`accelerate launch` / `torchrun`, DDP; docs/distributed.md): process r takes the
  prompts at positions r, r + world, ... of the step's batch with all their G completions (group
  advantages stay exact); metrics are reduced over processes; only process 0 writes files. Every process
  reads the checkpoint on resume (output_dir must be on a shared file system across nodes). A failed
  collective (a peer died, or stalled past collective_timeout_s) raises CollectiveError on the others;
  Ctrl-C with several processes saves nothing (they may be stopped in different collectives) and the
  last periodic checkpoint is the resume point.
- FSDP2 (`accelerate launch` with `distributed_type: FSDP` and `fsdp_version: 2`, i.e. the environment
  ACCELERATE_USE_FSDP=true FSDP_VERSION=2): the trainer shards the model itself with torch's
  `fully_shard`, one unit per decoder layer plus the root (embeddings, final norm, LM head), on CPU (gloo;
  accelerate itself ignores FSDP there) and GPU alike. Rollouts run the sharded module (a skipped layer's
  unit is simply not called); every forward is a collective, so the decode loop stops only when all
  processes are done; gradients are reduce-scattered after every micro-batch (no `no_sync`: that would keep
  unsharded gradients); checkpoints gather full state dicts (all processes take part, process 0 writes);
  the finite-weights check is all-reduced. An FSDP checkpoint's optimizer.pt is keyed by parameter name
  (torch.distributed.checkpoint's full optimizer state dict), so it resumes under FSDP only.
"""

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nested_reft.config import ConfigError, TrainConfig, save_yaml
from nested_reft.data import DataError, encode_prompt, load_examples
from nested_reft.layer_skip import check_skip_config, skip_set_at
from nested_reft.nested import enable_activation_checkpointing, find_layers, num_layers
from nested_reft.objectives import group_advantages, importance_weights, policy_loss
from nested_reft.rewards import math_reward
from nested_reft.rollout import Rollout, SamplingConfig, generate, sequence_logprobs

CHECKPOINTS = "checkpoints"


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


# ---- setup ------------------------------------------------------------------------------------


def _load_model(name: str, device=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={name!r} does not load: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model={name!r}: its tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_prompts(cfg: TrainConfig, tokenizer) -> list[Prompt]:
    try:
        examples = load_examples(cfg.dataset, cfg.split, cfg.data_dir, cfg.limit)
    except DataError as exc:
        raise ConfigError(f"dataset={cfg.dataset!r}: {exc}") from None
    if not examples:
        raise ConfigError(f"dataset={cfg.dataset!r} split={cfg.split!r} has no examples")
    return [Prompt(encode_prompt(tokenizer, ex.problem, cfg.template), ex.answer,
                   list((ex.meta or {}).get("answer_alternatives") or [])) for ex in examples]


def check_model(cfg: TrainConfig, model) -> int:
    """N for the model; raises ConfigError when the model cannot be nested as configured."""
    try:
        find_layers(model)
        n = num_layers(model)
        check_skip_config(n, cfg.skip_ratio, cfg.border)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r}: {exc}") from None
    return n


def setup(cfg: TrainConfig) -> Run:
    """Validate everything, load model/data, build optimizer and scheduler. Writes nothing."""
    cfg.validate()
    if cfg.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("report_to=tensorboard needs the tensorboard package (pip install tensorboard)")
    accelerator = make_accelerator(cfg)
    fsdp = use_fsdp()
    model, tokenizer = _load_model(cfg.model)
    n = check_model(cfg, model)
    prompts = load_prompts(cfg, tokenizer)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    ref_model = None
    if cfg.beta > 0:
        ref_model, _ = _load_model(cfg.model)
        ref_model.requires_grad_(False).eval().to(accelerator.device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    if fsdp:
        shard_model(model, accelerator.device)
        if ref_model is not None:
            shard_model(ref_model, accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = make_scheduler(cfg, optimizer)
    if not fsdp:  # accelerate's own FSDP2 preparation is GPU-only; the sharded model needs no wrapper
        model, optimizer = accelerator.prepare(model, optimizer)
    return Run(cfg, model, tokenizer, prompts, ref_model, accelerator, optimizer, scheduler, n, Path(cfg.output_dir),
               fsdp)


def use_fsdp() -> bool:
    """Whether the launcher asked for FSDP (accelerate's environment); only FSDP2 is supported."""
    import torch.distributed as dist

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP: only fsdp_version: 2 (torch fully_shard) is supported, "
                          f"got FSDP_VERSION={os.environ.get('FSDP_VERSION', '1')}")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ConfigError("FSDP: fsdp_cpu_ram_efficient_loading is not supported (every process loads the "
                          "model, then shards it); set it to false")
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_model(model, device) -> None:
    """FSDP2 in place: one unit per decoder layer (gathered for its forward, resharded after), then the
    root (embeddings, final norm, LM head; kept gathered between forward and backward)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in find_layers(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def make_accelerator(cfg: TrainConfig):
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available")
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    auto = not cpu and torch.cuda.is_bf16_supported()  # bf16 on GPUs that have it (not e.g. V100)
    bf16 = str(cfg.bf16).lower() == "true" or (str(cfg.bf16).lower() == "auto" and auto)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=[timeout])


def make_scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    warmup = int(math.ceil(cfg.warmup_ratio * cfg.steps))
    # HF's "constant" ignores num_warmup_steps; ours means constant after the warm-up
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps)


# ---- what each step uses: pure functions of (seed, step) ----------------------------------------


def step_prompt_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the step's prompts: consecutive slices of one seeded permutation per epoch."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def step_skip_set(cfg: TrainConfig, n: int, step: int) -> tuple[int, ...]:
    """The skip set of step `step` (0-based): the same on every process and after a resume."""
    return skip_set_at(n, cfg.skip_ratio, cfg.border, cfg.seed, step)


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
    policy = acc.unwrap_model(run.model)
    gens = sampling_generators(cfg, step, local_positions(run))
    if len(gens) != len(prompts):
        raise ValueError(f"do_rollouts expects this process's {len(gens)} prompts, got {len(prompts)}")
    eos = eos_ids(run)
    all_done = (lambda done: global_sum(acc, 0.0 if done else 1.0) == 0) if run.fsdp else None
    parts = []
    with acc.autocast():
        for i in range(0, len(prompts), cfg.rollout_batch_size):
            chunk = [p.ids for p in prompts[i:i + cfg.rollout_batch_size]]
            parts.append(generate(policy, chunk, cfg.num_generations, sampling_config(cfg), eos,
                                  run.tokenizer.pad_token_id, skip=skip,
                                  generator=gens[i:i + cfg.rollout_batch_size], all_done=all_done))
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
    texts = run.tokenizer.batch_decode(rollout.completion_ids * rollout.completion_mask, skip_special_tokens=True)
    answers = [p.answer for p in prompts for _ in range(g)]
    alts = [p.alternatives for p in prompts for _ in range(g)]
    return torch.tensor(math_reward(texts, answers, alts), dtype=torch.float32)


def eos_ids(run: Run):
    """The EOS id(s) the sampler stops at (and suppresses before min_new_tokens)."""
    return run.accelerator.unwrap_model(run.model).generation_config.eos_token_id or run.tokenizer.eos_token_id


def full_logprobs(run: Run, model, rollout: Rollout, rows: slice = slice(None), batch_size=None) -> torch.Tensor:
    """Teacher-forced full-depth log-probs [rows, L] of the rollout's completions under `model`, scored
    on the distribution the sampler used (temperature, EOS suppressed before min_new_tokens)."""
    return sequence_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                             rollout.completion_mask[rows], run.cfg.temperature, batch_size, eos_ids(run),
                             run.cfg.min_new_tokens)


def global_sum(acc, value: float) -> float:
    t = torch.tensor([float(value)], device=acc.device)
    return float(acc.reduce(t, "sum").item()) if acc.num_processes > 1 else float(value)


def loss_scale(loss_type: str, mask: torch.Tensor, total_tokens: float, total_rows: float) -> float:
    """Weight of a micro-batch's mean loss so that micro-batches sum to the full-batch loss."""
    if loss_type == "bnpo":
        return float(mask.sum()) / max(total_tokens, 1.0)
    return mask.size(0) / total_rows  # grpo and dr_grpo average over sequences


def update(run: Run, rollout: Rollout, advantages, old_lp, ref_lp) -> tuple[float, float, bool, dict, dict]:
    """num_iterations optimizer updates on one rollout batch; returns (loss, grad_norm, applied, loss
    metrics, importance-weight metrics). old_lp [B*G, L] is pi_old's log-probs, or None when
    num_iterations == 1: then pi_old is the policy itself before this update, and each micro-batch's
    own forward gives its log-probs (detached), which saves a full forward pass."""
    cfg, acc = run.cfg, run.accelerator
    rows = cfg.micro_batch_size * cfg.num_generations
    world = acc.num_processes
    total_tokens = global_sum(acc, rollout.completion_mask.sum())
    total_rows = global_sum(acc, rollout.completion_ids.size(0))
    losses, applied_all, norm, extra, targets = [], True, 0.0, {}, []
    for it in range(cfg.num_iterations):
        starts = list(range(0, rollout.completion_ids.size(0), rows))
        for k, i in enumerate(starts):
            sl = slice(i, i + rows)
            sync = run.fsdp or k == len(starts) - 1  # FSDP: reduce-scatter every micro-batch
            with (nullcontext() if sync else acc.no_sync(run.model)), acc.autocast():
                lp = full_logprobs(run, run.model, rollout, sl)  # [rows, L], with grad
                target = lp.detach() if old_lp is None else old_lp[sl]
                h, _ = importance_weights(target, rollout.behavior_logprobs[sl], rollout.completion_mask[sl],
                                          cfg.mitigation, cfg.lam, cfg.is_level)  # row-local: same as on the batch
                loss, extra = policy_loss(lp, None if old_lp is None else old_lp[sl], advantages[sl], h,
                                          rollout.completion_mask[sl], cfg.loss_type, cfg.max_new_tokens,
                                          cfg.epsilon, None, None if ref_lp is None else ref_lp[sl], cfg.beta)
                scaled = loss * loss_scale(cfg.loss_type, rollout.completion_mask[sl], total_tokens, total_rows)
                acc.backward(scaled * world)  # DDP/FSDP average over processes; undo it to get the global sum
            losses.append(scaled.detach())
            if it == 0:
                targets.append(target)
        norm, applied = finish_update(run)
        applied_all = applied_all and applied
    loss = global_sum(acc, torch.stack(losses).sum()) / cfg.num_iterations
    _, hm = importance_weights(torch.cat(targets), rollout.behavior_logprobs, rollout.completion_mask, cfg.mitigation,
                               cfg.lam, cfg.is_level)
    return loss, norm, applied_all, extra, hm


def finish_update(run: Run) -> tuple[float, bool]:
    """Clip, then step only if loss and gradient are finite on every process; always zero the grads."""
    cfg, acc = run.cfg, run.accelerator
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = acc.clip_grad_norm_(run.model.parameters(), max_norm)
    norm = float(full_tensor(norm)) if norm is not None else 0.0
    bad = global_sum(acc, 0.0 if math.isfinite(norm) else 1.0)
    if bad == 0:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, bad == 0


def rl_step(run: Run, step: int) -> dict:
    """Algorithm 1, lines 7-15, for step `step` (0-based); returns the metrics line."""
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    prompts = local_prompts(run, step)
    skip = step_skip_set(cfg, run.num_layers, step)
    rollout = do_rollouts(run, prompts, skip, step)
    rewards = score(run, prompts, rollout)
    advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards).to(acc.device)
    t1 = time.perf_counter()
    micro_rows = cfg.micro_batch_size * cfg.num_generations
    with acc.autocast(), torch.no_grad():  # pi_old is needed apart from the update only when it is reused
        old_lp = None if cfg.num_iterations == 1 else full_logprobs(run, acc.unwrap_model(run.model), rollout,
                                                                    batch_size=micro_rows)
        ref_lp = None if run.ref_model is None else full_logprobs(run, run.ref_model, rollout, batch_size=micro_rows)
    run.model.train()
    loss, norm, applied, extra, hm = update(run, rollout, advantages, old_lp, ref_lp)
    run.scheduler.step()
    t2 = time.perf_counter()
    return step_metrics(run, step, skip, rewards, rollout, hm, loss, norm, applied, extra,
                        rollout_s=rollout.rollout_s, update_s=t2 - t1, step_s=t2 - t0)


def gather_rows(acc, values: list[float]) -> torch.Tensor:
    """Local scalars [k] from every process as [world, k] (just [1, k] on one process)."""
    t = torch.tensor([values], dtype=torch.float64, device=acc.device)
    return acc.gather(t).cpu() if acc.num_processes > 1 else t.cpu()


def step_metrics(run, step, skip, rewards, rollout, hm, loss, norm, applied, extra, rollout_s, update_s, step_s):
    """The metrics.jsonl line of one step, reduced over processes: sums, min/max, and means weighted by
    each process's count (IS units for the h metrics, generated tokens for clip_frac), so that N
    processes report what one process would for the same batch."""
    acc = run.accelerator
    local = [rollout.num_completion_tokens, rollout.num_prompt_tokens, rollout.completion_ids.size(0),
             hm["h_mean"], hm["h_min"], hm["h_max"], hm["h_truncated_frac"], hm["log_ratio_mean"],
             extra.get("clip_frac", 0.0), rollout_s, hm.get("num_units", 1.0)]
    rows = gather_rows(acc, local)  # [world, 11]
    gen_tokens, prompt_tokens, seqs = (float(rows[:, i].sum()) for i in range(3))

    def weighted(col: int, weight_col: int) -> float:
        w = rows[:, weight_col]
        return float((rows[:, col] * w).sum() / w.sum()) if float(w.sum()) > 0 else float(rows[:, col].mean())

    units = rows[rows[:, 10] > 0] if bool((rows[:, 10] > 0).any()) else rows  # processes with IS units
    all_rewards = acc.gather(rewards.to(acc.device)).cpu() if acc.num_processes > 1 else rewards
    tokens = prompt_tokens + gen_tokens
    rollout_s = float(rows[:, 9].max())
    return {
        "step": step + 1,
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
        "loss": loss if math.isfinite(loss) else None,
        "skip_set": list(skip),
        "num_skipped": len(skip),
        "h_mean": weighted(3, 10),
        "h_min": float(units[:, 4].min()),
        "h_max": float(units[:, 5].max()),
        "h_truncated_frac": weighted(6, 10),
        "log_ratio_mean": weighted(7, 10),
        "tokens_generated": int(gen_tokens),
        "tokens_processed": int(tokens),
        "completion_len_mean": gen_tokens / seqs,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "rollout_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": norm if math.isfinite(norm) else None,
        "skipped_update": not applied,
        "clip_frac": weighted(8, 0),
    }


# ---- checkpoints --------------------------------------------------------------------------------


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def full_tensor(t):
    """A DTensor (FSDP) gathered into a plain tensor; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def weights_finite(run: Run) -> bool:
    """All weights finite; under FSDP each process checks its shard and the verdict is all-reduced."""
    shards = (p.to_local() if hasattr(p, "to_local") else p for p in run.model.parameters())
    local = all(bool(torch.isfinite(t).all()) for t in shards)
    return global_sum(run.accelerator, 0.0 if local else 1.0) == 0 if run.fsdp else local


def full_state(run: Run, optimizer: bool) -> tuple[dict | None, dict | None]:
    """(model state dict, optimizer state dict or None) for process 0 to write. Under FSDP every process
    must call this: it gathers the full state dicts to process 0's CPU (the others get empty dicts).
    Without FSDP: (None, optimizer.state_dict()); save_pretrained reads the model itself."""
    if not run.fsdp:
        return None, run.optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(run.model, options=opts)
    first = {}  # tied weights arrive as separate copies: make them one tensor again, so that
    for name, p in run.model.named_parameters(remove_duplicate=False):  # save_pretrained drops the alias
        if name in model_sd:
            model_sd[name] = model_sd[first.setdefault(id(p), name)]
    return model_sd, get_optimizer_state_dict(run.model, run.optimizer, options=opts) if optimizer else None


def save_model(run: Run, path: Path, model_sd: dict | None) -> None:
    """save_pretrained of the policy (safetensors) and the tokenizer; `model_sd` from full_state."""
    run.accelerator.unwrap_model(run.model).save_pretrained(path, state_dict=model_sd, safe_serialization=True)
    run.tokenizer.save_pretrained(path)


def save_checkpoint(run: Run, step: int, state: dict) -> Path | None:
    """Atomically write model (safetensors), tokenizer, optimizer, scheduler and trainer state (rank 0)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = checkpoint_dir(run.out, step)
    if not weights_finite(run):
        raise RuntimeError(f"refusing to checkpoint step {step}: the weights are not finite")
    model_sd, optim_sd = full_state(run, optimizer=True)
    if acc.is_main_process:
        tmp = final.parent / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(run, tmp, model_sd)
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(run.out, run.cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def prune_checkpoints(out: Path, keep: int) -> None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: Run, path: Path) -> dict:
    """Restore weights, optimizer and scheduler from `path`; returns its trainer state."""
    from safetensors.torch import load_file

    policy = run.accelerator.unwrap_model(run.model)
    state_dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        state_dict.update(load_file(shard))
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    by_name = any(isinstance(k, str) for k in optim_sd.get("state", {}))  # keyed by name: written under FSDP
    if optim_sd.get("state") and by_name != run.fsdp:
        raise ConfigError(f"checkpoint {path} was written {'with' if by_name else 'without'} FSDP: its optimizer "
                          f"state resumes only {'with' if by_name else 'without'} FSDP")
    if run.fsdp:
        missing, unexpected = load_sharded(run, state_dict, optim_sd)
    else:
        missing, unexpected = policy.load_state_dict(state_dict, strict=False)
        run.optimizer.load_state_dict(optim_sd)
    missing = [k for k in missing if k not in _tied_keys(policy)]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    run.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def load_sharded(run: Run, model_sd: dict, optim_sd: dict) -> tuple[list[str], list[str]]:
    """FSDP: every process keeps its shard of the full state dicts (model, then the optimizer's, keyed by
    parameter name as full_state wrote it); returns (missing, unexpected) model keys."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    keys = set_model_state_dict(run.model, model_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(run.model, run.optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    return list(keys.missing_keys), list(keys.unexpected_keys)


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


# ---- the loop -----------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl on the main process: one flushed line per step; truncated to `step` on resume."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            lines = path.read_text().splitlines() if (resume_step and path.exists()) else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
                f.flush()
                os.fsync(f.fileno())


def make_tracker(cfg: TrainConfig, out: Path, enabled: bool):
    """A `log(metrics, step)` callable for TensorBoard / W&B, or None."""
    if not enabled or cfg.report_to == "none":
        return None
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        return lambda m, s: [writer.add_scalar(k, v, s) for k, v in m.items() if isinstance(v, (int, float))]
    import wandb

    wandb.init(project="nested-reft", dir=str(out), config=vars(cfg))
    return lambda m, s: wandb.log({k: v for k, v in m.items() if not isinstance(v, list)}, step=s)


def prepare_output(run: Run) -> tuple[int, dict]:
    """Create the run directory (or resume it); returns (first step, accumulated state)."""
    cfg, out = run.cfg, run.out
    state = {"runtime_s": 0.0, "tokens_processed": 0, "tokens_generated": 0, "rollout_s": 0.0,
             "skipped_updates": 0, "rewards": []}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and (out / "metrics.jsonl").exists():
        raise ConfigError(f"resume: {out} has metrics but no complete checkpoint to resume from")
    if not cfg.resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"output_dir={str(out)!r} already holds a run; pass --resume true or choose another")
    if run.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
    run.accelerator.wait_for_everyone()
    if ckpt is None:
        return 0, state
    state.update(load_checkpoint(run, ckpt))
    return int(state["step"]), state


class CollectiveError(RuntimeError):
    """A collective across processes failed: a peer process died or stopped answering."""


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's own error types, or gloo/NCCL errors (gloo raises plain RuntimeErrors)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "Connection closed by peer",
                                                                       "Connection reset by peer"))


@contextmanager
def collective_failures(run: Run):
    """Turn a failed collective into a CollectiveError that says what most likely happened."""
    acc = run.accelerator
    try:
        yield
    except RuntimeError as exc:
        if acc.num_processes < 2 or isinstance(exc, CollectiveError) or not is_collective_failure(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CollectiveError(
            f"process {acc.process_index} of {acc.num_processes}: a collective operation failed: another process "
            f"died or did not answer within collective_timeout_s={run.cfg.collective_timeout_s} s (see its log). "
            f"This process stops too; resume from the last checkpoint with --resume true. "
            f"({type(exc).__name__}: {first})") from exc


def train(cfg: TrainConfig, run: Run | None = None) -> dict:
    """Run the RL stage; returns the summary (also written to summary.json). With several processes, a
    dead or stalled peer makes every other process raise CollectiveError (after at most
    collective_timeout_s) instead of hanging."""
    run = run or setup(cfg)
    with collective_failures(run):
        return _train(run)


def _train(run: Run) -> dict:
    cfg, acc = run.cfg, run.accelerator
    start_step, state = prepare_output(run)
    log = MetricsLog(run.out / "metrics.jsonl", acc.is_main_process, start_step)
    tracker = make_tracker(cfg, run.out, acc.is_main_process)
    bar = _progress(cfg, acc, start_step)
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            metrics = rl_step(run, step)
            _accumulate(state, metrics)
            log.write(metrics)
            if tracker:
                tracker(metrics, step + 1)
            if bar:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", skip=len(metrics["skip_set"]))
            if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.steps:
                save_checkpoint(run, step + 1, state)
        step = cfg.steps
    except KeyboardInterrupt:
        done = len(state["rewards"])  # steps finished, resumed ones included
        if acc.num_processes > 1:  # processes may be stopped inside different collectives: no joint save
            if acc.is_main_process:
                print(f"\ninterrupted: resume from the last checkpoint, {latest_checkpoint(run.out)}", flush=True)
            raise
        if acc.is_main_process:
            print(f"\ninterrupted: saving a checkpoint of step {done} to resume from", flush=True)
        save_checkpoint(run, done, state)
        raise
    finally:
        if bar:
            bar.close()
    save_checkpoint(run, cfg.steps, state)
    return finish(run, state)


def _accumulate(state: dict, m: dict) -> None:
    state["runtime_s"] += m["step_s"]
    state["tokens_processed"] += m["tokens_processed"]
    state["tokens_generated"] += m["tokens_generated"]
    state["rollout_s"] += m["rollout_s"]
    state["skipped_updates"] += int(m["skipped_update"])
    state["rewards"].append(m["reward_mean"])


def _progress(cfg: TrainConfig, acc, start: int):
    if not (cfg.progress and acc.is_main_process):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="RL steps", unit="step", dynamic_ncols=True)


def finish(run: Run, state: dict) -> dict:
    """Write the final HF checkpoint (output_dir/final) and summary.json."""
    acc, cfg = run.accelerator, run.cfg
    rewards = state["rewards"]
    k = max(1, len(rewards) // 10)  # first and final reward: means over a tenth of the steps (one step is noisy)
    summary = {
        "steps": cfg.steps,
        "runtime_s": state["runtime_s"],
        "tokens_processed": state["tokens_processed"],
        "tokens_generated": state["tokens_generated"],
        "token_speed": state["tokens_processed"] / max(state["runtime_s"], 1e-9),
        "rollout_tokens_per_s": state["tokens_generated"] / max(state["rollout_s"], 1e-9),
        "rollout_s": state["rollout_s"],
        "first_reward": sum(rewards[:k]) / len(rewards[:k]) if rewards else None,
        "final_reward": sum(rewards[-k:]) / len(rewards[-k:]) if rewards else None,
        "skipped_updates": state["skipped_updates"],
        "skip_ratio": cfg.skip_ratio, "border": cfg.border, "mitigation": cfg.mitigation,
        "num_layers": run.num_layers, "num_processes": acc.num_processes, "fsdp": run.fsdp,
        "final_checkpoint": str(run.out / "final"),
    }
    model_sd, _ = full_state(run, optimizer=False)
    if acc.is_main_process:
        final = run.out / "final"
        tmp = run.out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(run, tmp, model_sd)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc.wait_for_everyone()
    return summary

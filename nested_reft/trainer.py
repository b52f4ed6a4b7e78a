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
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nested_reft.checkpoint import MetricsLog, latest_checkpoint, prepare_output, save_checkpoint, save_final
from nested_reft.config import ConfigError, TrainConfig
from nested_reft.data import DataError, encode_prompt, load_examples
from nested_reft.distributed import (collective_failures, full_tensor, gather_rows, global_sum, make_accelerator,
                                     shard_model, use_fsdp)
from nested_reft.layer_skip import check_skip_config, skip_set_at
from nested_reft.nested import enable_activation_checkpointing, find_layers, num_layers
from nested_reft.objectives import group_advantages, importance_weights, policy_loss
from nested_reft.rewards import math_reward
from nested_reft.rollout import Rollout, SamplingConfig, generate, sequence_logprobs


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
    accelerator = make_accelerator(cfg.device, cfg.bf16, cfg.collective_timeout_s)
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


# ---- the loop -----------------------------------------------------------------------------------


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


class Loop:
    """One run's RL stage, one step at a time: `train` runs a Loop to the end, the sweep's lockstep mode
    interleaves several. Opening it creates (or resumes) the run directory."""

    def __init__(self, run: Run):
        self.run = run
        self.start, self.state = prepare_output(run)
        main = run.accelerator.is_main_process
        self.log = MetricsLog(run.out / "metrics.jsonl", main, self.start)
        self.tracker = make_tracker(run.cfg, run.out, main)

    def step(self, step: int) -> dict:
        """RL step `step` (0-based): update, log, and checkpoint when due; returns its metrics."""
        run = self.run
        metrics = rl_step(run, step)
        _accumulate(self.state, metrics)
        self.log.write(metrics)
        if self.tracker:
            self.tracker(metrics, step + 1)
        if (step + 1) % run.cfg.save_steps == 0 and step + 1 < run.cfg.steps:
            save_checkpoint(run, step + 1, self.state)
        return metrics

    def finish(self) -> dict:
        """The last checkpoint, the final model and the summary."""
        save_checkpoint(self.run, self.run.cfg.steps, self.state)
        return finish(self.run, self.state)


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
        for step in range(loop.start, cfg.steps):
            metrics = loop.step(step)
            if bar:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", skip=len(metrics["skip_set"]))
    except KeyboardInterrupt:
        done = len(loop.state["rewards"])  # steps finished, resumed ones included
        if acc.num_processes > 1:  # processes may be stopped inside different collectives: no joint save
            if acc.is_main_process:
                print(f"\ninterrupted: resume from the last checkpoint, {latest_checkpoint(run.out)}", flush=True)
            raise
        if acc.is_main_process:
            print(f"\ninterrupted: saving a checkpoint of step {done} to resume from", flush=True)
        save_checkpoint(run, done, loop.state)
        raise
    finally:
        if bar:
            bar.close()
    return loop.finish()


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
    """Write the final HF checkpoint (output_dir/final) and summary.json; returns the summary."""
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
    save_final(run, summary)
    return summary

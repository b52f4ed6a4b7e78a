"""SFT warm-up (SPEC 2 item 10): cross-entropy on (prompt, chain-of-thought target), prompt masked out.

Choices:
- Everything is checked before training starts: config values, the data set and every SFT target,
  the model and tokenizer, and that every prompt fits `max_length`. A bad input writes nothing.
- One example = prompt tokens (labels -100) + target tokens + EOS; batches are right-padded and the
  padding is masked too. A target cut by `max_length` is counted in the summary, never dropped.
- An update's loss is the mean over every target token of its `grad_accum_steps` micro-batches and of
  all processes (each micro-batch's summed cross-entropy divided by the update's total target tokens, as
  transformers' Trainer does with `num_items_in_batch`), so an example weighs by its tokens, not by
  the micro-batch it landed in. Then the gradient norm is clipped to `max_grad_norm`, then AdamW with
  linear warmup and decay. A non-finite loss or gradient norm skips that update (counted), weights untouched.
- The target log-probs come from `logprobs.scored_head` (head and log-softmax fused chunk by chunk, so no
  [B, L, V] float32 logits are held for backward) when `supports_scored_head` allows it; models that
  transform their logits after the head (soft-capping, logit scales) use the full logits instead.
- It runs through `accelerate.Accelerator`: CUDA when present (bf16 autocast there by default), CPU
  otherwise, and `accelerate launch` / `torchrun` shard the examples over processes (DDP; gloo on CPU).
  The token count is summed over processes, so N processes with batch_size b give the gradient of one
  process with b*N. A dead or stalled peer fails the collectives after
  `collective_timeout_s` instead of hanging; only process 0 writes the checkpoint (docs/distributed.md).
- `layer_drop` x > 0 (beyond the paper; off by default) runs every other update through a fresh nested
  model (skip ratio x, border 1, the RL trainer's sampler, seeded by (seed, update)), like LayerDrop. A
  small model trained without it has no spare layers: its nested models are much worse than it, and
  Nested-ReFT's behaviour model with them (docs/results.md). Under DDP the skipped layers get no gradient,
  so `find_unused_parameters` is on when layer_drop > 0.
- `compile` runs the decoder layers through torch.compile'd wrappers (compiled.py, as `train --compile`)
  for the whole training loop; the checkpoint is written after, with the model's own layers.
- The checkpoint (safetensors + tokenizer + sft_summary.json) is written to a temporary sibling
  directory and renamed into `output_dir`, so a crash never leaves a half-written checkpoint there.
- LoRA (`lora_r` > 0, peft; models.apply_lora): only the adapters train and `output_dir` holds the adapter
  (adapter_model.safetensors, adapter_config.json naming the base model by absolute path) with the
  tokenizer; `merge_lora` adds `output_dir/merged/`, base + adapter as one plain HF model. Both work as
  `--model` of train and eval: an adapter directory loads as its base with the adapter merged in. The
  model's own dropout stays as it is (SFT never switched it off) and `lora_dropout` adds the adapters'.
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nested_reft.compiled import check_compiler, compile_layers, using_layers
from nested_reft.config import (LORA_HELP, LORA_TARGET_MODULES, ConfigError, check_choice, check_finite_floats,
                                check_lora, check_range, doc, output_dir_problems, raise_if, resolve_lora_alpha)
from nested_reft.data import DataError, encode_prompt, load_examples, resolve_template, sft_target
from nested_reft.distributed import global_sum
from nested_reft.logprobs import scored_head, supports_scored_head
from nested_reft.models import (apply_lora, load_model_and_tokenizer, require_peft, save_merged, save_pretrained,
                                trainable_parameters)
from nested_reft.nested import enable_activation_checkpointing
from nested_reft.objectives import token_logprobs
from nested_reft.trainer import advance


@dataclass
class SFTConfig:
    model: str = doc("", "model directory or hub id to warm up (AutoModelForCausalLM)")
    dataset: str = doc("", "data set name under data_dir, a .jsonl path, or a hub id")
    data_dir: str | None = doc(None, "data root in the shared layout (default: $NESTED_REFT_DATA)")
    split: str = doc("train", "which split of the data set to train on")
    output_dir: str = doc("", "where the HF checkpoint and sft_summary.json are written")
    epochs: int = doc(2, "passes over the data (the paper's E_sft = 2)")
    batch_size: int = doc(8, "examples per micro-batch (per process)")
    grad_accum_steps: int = doc(1, "micro-batches per optimizer update")
    lr: float = doc(1e-5, "peak AdamW learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_ratio: float = doc(0.03, "fraction of updates with linear warmup, then linear decay to 0")
    max_grad_norm: float = doc(1.0, "gradient clipping")
    max_length: int = doc(1024, "prompt + target tokens; longer targets are cut (counted)")
    template: str = doc("auto", "prompt template: auto (chat if the tokenizer has one), chat, plain")
    seed: int = doc(0, "shuffling and any random init")
    limit: int | None = doc(None, "use only the first N examples")
    bf16: bool | None = doc(None, "bf16 autocast (default: on when CUDA supports it)")
    collective_timeout_s: int = doc(600, "seconds before a stalled collective (dead peer process) aborts the run")
    gradient_checkpointing: bool = doc(False, "trade compute for activation memory")
    compile: bool = doc(False, "torch.compile the decoder layers (one wrapper per layer, dynamic shapes; compiled.py)")
    progress: bool = doc(True, "show a progress bar (stderr)")
    group_by_length: bool = doc(False, "batch examples of like length together (sorted within mega-batches, as transformers' "
                                       "LengthGroupedSampler, then the batches shuffled): "
                                       "less padding, every example still once per epoch (on the toy task it "
                                       "hurt: docs/results.md)")
    layer_drop: float = doc(0.0, "skip ratio x of a fresh nested model (border 1) on every other update, so the result's nested models work too; 0 = off")
    lora_r: int = doc(0, LORA_HELP["lora_r"])
    lora_alpha: float | None = doc(None, LORA_HELP["lora_alpha"])
    lora_dropout: float = doc(0.0, "dropout on the adapters' input (SFT keeps the model's own dropout too)")
    lora_target_modules: list[str] = doc(LORA_TARGET_MODULES, LORA_HELP["lora_target_modules"])
    merge_lora: bool = doc(False, LORA_HELP["merge_lora"] + " (output_dir/merged/)")

    def __post_init__(self):
        resolve_lora_alpha(self)


def check_config(cfg: SFTConfig) -> None:
    """Raise ConfigError (a ValueError) naming every bad field (or an FSDP launch, which sft does not support)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("sft: FSDP is not supported (only `train` shards the model); launch sft with DDP "
                          "(e.g. configs/accelerate/ddp-multigpu.yaml) or a model that fits one device")
    e = [f"sft: `{name}` is required" for name in ("model", "dataset", "output_dir") if not getattr(cfg, name)]
    for name in ("epochs", "batch_size", "grad_accum_steps", "max_length", "collective_timeout_s"):
        check_range(e, name, getattr(cfg, name), 1)
    check_range(e, "lr", cfg.lr, 0.0, low_open=True)
    check_range(e, "warmup_ratio", cfg.warmup_ratio, 0.0, 1.0, high_open=True)
    check_range(e, "weight_decay", cfg.weight_decay, 0.0)
    check_range(e, "max_grad_norm", cfg.max_grad_norm, 0.0, low_open=True)
    check_range(e, "layer_drop", cfg.layer_drop, 0.0, 1.0, high_open=True)
    check_choice(e, "template", cfg.template, ("auto", "chat", "plain"))
    if cfg.limit is not None:
        check_range(e, "limit", cfg.limit, 1)
    check_lora(e, cfg)
    check_finite_floats(e, cfg)
    if cfg.output_dir:
        e += output_dir_problems(Path(cfg.output_dir))
    if cfg.compile and (problem := check_compiler("cuda" if torch.cuda.is_available() else "cpu")):
        e.append(problem)
    raise_if(e)
    if cfg.lora_r > 0:
        require_peft(f"lora_r={cfg.lora_r}")


# ---- examples and batches ---------------------------------------------------------------------


def build_example(tokenizer, prompt_ids: list[int], target: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example: prompt labels are -100, target + EOS are learned."""
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return input_ids, labels


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels); padding is masked in attention and labels."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(items), width), -100, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)  # [B, L]
    for row, (ids, labs) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


#: group_by_length sorts within mega-batches of this many batches (as transformers' LengthGroupedSampler).
MEGA_BATCH = 50


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """Shuffled index batches for one epoch; every process gets an equal share of one permutation. With
    `lengths` (group_by_length), each run of MEGA_BATCH batches of the share is sorted by length before it
    is cut, and the batches are then shuffled: a batch holds examples of like length (less padding), and
    every example still comes once per epoch in a seeded random batch order."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    share = order[rank : (n // world) * world : world] if world > 1 else order
    if lengths is not None:
        mega = MEGA_BATCH * batch_size
        share = [i for k in range(0, len(share), mega)
                 for i in sorted(share[k:k + mega], key=lambda j: -lengths[j])]
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    if lengths is not None:
        batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def prepare(cfg: SFTConfig, tokenizer) -> tuple[list, int]:
    """Load the data set and tokenize every example; returns (items, number of cut targets)."""
    examples = load_examples(cfg.dataset, cfg.split, cfg.data_dir, cfg.limit)
    template = resolve_template(tokenizer, cfg.template)
    items, truncated = [], 0
    for ex in examples:
        prompt_ids = encode_prompt(tokenizer, ex.problem, template)
        if len(prompt_ids) >= cfg.max_length:
            raise DataError(f"example {ex.id}: prompt has {len(prompt_ids)} tokens, max_length is {cfg.max_length}")
        ids, labels = build_example(tokenizer, prompt_ids, sft_target(ex, cfg.dataset), cfg.max_length)
        truncated += len(ids) == cfg.max_length
        items.append((ids, labels))
    return items, truncated


# ---- loading and saving -----------------------------------------------------------------------


def save_atomically(model, tokenizer, summary: dict, output_dir: Path, merge_lora: bool = False) -> None:
    """save_pretrained into a temporary sibling, then rename it into place (replacing an old one). A file
    system failure removes the temporary directory and raises CheckpointError. With LoRA the directory holds
    the adapter, and with `merge_lora` also merged/: base + adapter as one plain HF model."""
    from nested_reft.checkpoint import recover_replaced, replace_dir, written_or_removed

    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    with written_or_removed(tmp, f"writing the SFT checkpoint {output_dir}"):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        recover_replaced(output_dir)  # an earlier save killed between its renames
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tokenizer, tmp)
        if merge_lora:
            save_merged(model, tokenizer, tmp / "merged")
        (tmp / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_dir(tmp, output_dir)


# ---- training ---------------------------------------------------------------------------------


def lr_lambda(num_updates: int, warmup_ratio: float):
    """Linear warmup over the first `warmup_ratio` of updates, then linear decay to 0."""
    warmup = int(num_updates * warmup_ratio)

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (num_updates - step) / max(1, num_updates - warmup))

    return scale


def update_skip_set(model, cfg: SFTConfig, update: int) -> tuple[int, ...]:
    """Layers skipped in update `update`: none, or with layer_drop > 0 on odd updates a fresh skip set
    drawn like the RL trainer's (ratio layer_drop, border 1), seeded by (seed, update): the same on
    every process."""
    if cfg.layer_drop == 0 or update % 2 == 0:
        return ()
    from nested_reft.layer_skip import skip_set_at
    from nested_reft.nested import num_layers

    return skip_set_at(num_layers(model), cfg.layer_drop, 1, cfg.seed, update)


def target_nll(model, batch: dict) -> torch.Tensor:
    """Summed negative log-likelihood of a micro-batch's target tokens (labels != -100), float32. Scored
    through the model's head chunk by chunk (`logprobs.scored_head`, no [B, L, V] logits) when the model
    allows it, else from its full logits."""
    labels = batch["labels"][:, 1:]  # [B, L-1]: position t predicts token t+1
    mask = labels != -100
    safe = labels.clamp(min=0)  # -100 -> a valid id, masked out below
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if supports_scored_head(model):
        with scored_head(model, safe) as scorer:
            model(**inputs, logits_to_keep=labels.shape[1] + 1)
            logp = scorer.result()  # [B, L-1]
    else:
        logp = token_logprobs(model(**inputs).logits[:, :-1], safe)  # [B, L-1] from [B, L-1, V] logits
    return -(logp * mask).sum()


def num_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def train_update(model, accelerator, optimizer, micro: list[dict], max_grad_norm: float,
                 skip: tuple[int, ...] = ()) -> tuple[float, int, bool]:
    """One optimizer update over micro-batches, with the layers in `skip` bypassed; returns (loss = mean
    NLL per target token over the update and all processes, tokens processed here, applied)."""
    from nested_reft.nested import skip_layers

    total = max(global_sum(accelerator, sum(num_targets(b) for b in micro)), 1.0)  # the update's target tokens
    nll, tokens = torch.zeros((), device=accelerator.device), 0
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        nested = skip_layers(accelerator.unwrap_model(model), skip) if skip else nullcontext()
        with nullcontext() if sync else accelerator.no_sync(model), nested:
            part = target_nll(model, batch)
            accelerator.backward(part * accelerator.num_processes / total)  # DDP averages: undo it
        nll = nll + part.detach()
        tokens += int(batch["attention_mask"].sum())
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    bad = float(not (torch.isfinite(nll) and torch.isfinite(norm)))
    stats = accelerator.reduce(torch.stack([nll.float(), torch.tensor(bad, device=nll.device)]), "sum")
    loss, applied = stats[0] / total, stats[1].item() == 0  # every process agrees
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), tokens, applied


def curve(values: list[float], points: int = 50) -> list[float]:
    """`values` averaged into at most `points` consecutive chunks (for the summary)."""
    size = max(1, math.ceil(len(values) / points))
    chunks = [values[i : i + size] for i in range(0, len(values), size)]
    return [round(sum(c) / len(c), 5) for c in chunks if c]


def make_optimizer(model, cfg: SFTConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (with LoRA the adapters only); weight decay on matrices only (not
    on norms and biases)."""
    params = trainable_parameters(model)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def train_epochs(model, accelerator, optimizer, items: list, cfg: SFTConfig, pad_id: int) -> tuple[list[float], int, int]:
    """The training loop; returns (loss per applied update, tokens processed here, skipped updates)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = [len(ids) for ids, _ in items] if cfg.group_by_length else None
    per_epoch = math.ceil(len(epoch_batches(len(items), cfg.batch_size, 0, cfg.seed, rank, world)) / cfg.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(per_epoch * cfg.epochs, cfg.warmup_ratio))
    losses, tokens, skipped = [], 0, 0
    bar = tqdm(total=per_epoch * cfg.epochs, desc="sft", disable=not (cfg.progress and accelerator.is_main_process))
    for epoch in range(cfg.epochs):
        batches = epoch_batches(len(items), cfg.batch_size, epoch, cfg.seed, rank, world, lengths)
        for u in range(0, len(batches), cfg.grad_accum_steps):
            micro = [collate([items[i] for i in b], pad_id) for b in batches[u : u + cfg.grad_accum_steps]]
            micro = [{k: v.to(accelerator.device) for k, v in m.items()} for m in micro]
            skip = update_skip_set(accelerator.unwrap_model(model), cfg, epoch * per_epoch + u // cfg.grad_accum_steps)
            loss, n, applied = train_update(model, accelerator, optimizer, micro, cfg.max_grad_norm, skip)
            advance(scheduler)
            tokens, skipped = tokens + n, skipped + (not applied)
            losses += [loss] if applied else []
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
    bar.close()
    return losses, tokens, skipped


def run_sft(cfg: SFTConfig) -> dict:
    """Train, save the checkpoint to `cfg.output_dir`, and return the summary (also sft_summary.json)."""
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    check_config(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    items, truncated = prepare(cfg, tokenizer)  # every problem must be fine before any work
    bf16 = cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # cpu=True without CUDA: otherwise accelerate ignores torchrun's processes (each would train alone)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))
    unused = DistributedDataParallelKwargs(find_unused_parameters=cfg.layer_drop > 0)  # skipped layers get no grad
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no",
                              kwargs_handlers=[timeout, unused])
    if len(items) < accelerator.num_processes:
        raise DataError(f"{len(items)} examples cannot be shared by {accelerator.num_processes} processes")
    torch.manual_seed(cfg.seed)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.seed,
                           cfg.model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    model.train()
    inner = accelerator.unwrap_model(model)
    start = time.perf_counter()
    with using_layers(inner, compile_layers(inner) if cfg.compile else None):  # saved below with its own layers
        losses, tokens, skipped = train_epochs(model, accelerator, optimizer, items, cfg, pad_id)
    runtime = time.perf_counter() - start
    tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item())
    summary = {
        "config": asdict(cfg),
        "num_examples": len(items),
        "truncated_targets": truncated,
        "updates": len(losses) + skipped,
        "skipped_updates": skipped,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_curve": curve(losses),
        "runtime_s": round(runtime, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(runtime, 1e-9), 1),
        "output_dir": str(cfg.output_dir),
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_atomically(accelerator.unwrap_model(model), tokenizer, summary, Path(cfg.output_dir), cfg.merge_lora)
    accelerator.wait_for_everyone()
    return summary

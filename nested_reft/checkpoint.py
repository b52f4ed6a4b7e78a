"""The run directory's persistent state: checkpoints (write, load, prune), metrics.jsonl, and resume.

Choices:
- A checkpoint `checkpoints/step-NNNNNN/` holds exactly the state after the step it names: the HF model
  (safetensors) and tokenizer, `optimizer.pt`, `scheduler.pt` and `trainer_state.json` (the step and
  the running totals). It is written into `checkpoints/.tmp-step-NNNNNN/` and renamed into place, so a
  killed run never leaves half a checkpoint under a real name; `trainer_state.json` is written last and
  marks a checkpoint complete. The last `keep_checkpoints` complete ones are kept.
- Weights are checked to be finite before they are written (all-reduced under FSDP).
- Under FSDP every process takes part in gathering the full state dicts; process 0 writes. An FSDP
  checkpoint's optimizer.pt is keyed by parameter name (torch.distributed.checkpoint's full optimizer
  state dict), so it resumes under FSDP only (and a DDP one without FSDP only): said before loading.
- metrics.jsonl gets one flushed, fsync'ed line per step, written by process 0; on resume it is cut
  back to the checkpoint's step.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from nested_reft.config import ConfigError, save_yaml
from nested_reft.distributed import weights_finite

CHECKPOINTS = "checkpoints"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are not)."""
    return sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


# ---- writing ----------------------------------------------------------------------------------


def full_state(run, optimizer: bool) -> tuple[dict | None, dict | None]:
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


def save_model(run, path: Path, model_sd: dict | None) -> None:
    """save_pretrained of the policy (safetensors) and the tokenizer; `model_sd` from full_state."""
    run.accelerator.unwrap_model(run.model).save_pretrained(path, state_dict=model_sd, safe_serialization=True)
    run.tokenizer.save_pretrained(path)


def save_checkpoint(run, step: int, state: dict) -> Path | None:
    """Atomically write model (safetensors), tokenizer, optimizer, scheduler and trainer state (rank 0)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = checkpoint_dir(run.out, step)
    if not weights_finite(run.model, acc, run.fsdp):
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
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_final(run, summary: dict) -> None:
    """output_dir/final (the HF model + tokenizer, atomically) and summary.json; every process calls it."""
    acc = run.accelerator
    model_sd, _ = full_state(run, optimizer=False)
    if acc.is_main_process:
        final, tmp = run.out / "final", run.out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(run, tmp, model_sd)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc.wait_for_everyone()


# ---- loading ----------------------------------------------------------------------------------


def load_checkpoint(run, path: Path) -> dict:
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


def load_sharded(run, model_sd: dict, optim_sd: dict) -> tuple[list[str], list[str]]:
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


# ---- the run directory and resume -------------------------------------------------------------


def new_state() -> dict:
    """The running totals a checkpoint carries (trainer_state.json)."""
    return {"runtime_s": 0.0, "tokens_processed": 0, "tokens_generated": 0, "rollout_s": 0.0,
            "skipped_updates": 0, "rewards": []}


def prepare_output(run) -> tuple[int, dict]:
    """Create the run directory (or resume it); returns (first step, accumulated state)."""
    cfg, out = run.cfg, run.out
    state = new_state()
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

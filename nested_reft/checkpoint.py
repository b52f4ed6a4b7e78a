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
- With LoRA the model part of a checkpoint is the adapter only (peft's adapter_model.safetensors and
  adapter_config.json): the frozen base is the `model` the run names, and optimizer.pt holds only the
  adapters' moments. `final/` holds the adapter and the tokenizer; with merge_lora also `final/merged/`, a
  plain HF model of base + adapter, written inside the same temporary directory, so it appears atomically
  with the adapter.
"""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from nested_reft.config import ConfigError, save_yaml
from nested_reft.distributed import weights_finite
from nested_reft.models import is_peft_model, save_merged, save_pretrained

CHECKPOINTS = "checkpoints"
# TrainConfig fields a resume may change: they do not change what the run computes, only how long it
# runs, how often it saves and what it shows. Every other field defines the run (a resume refuses a change).
RESUME_MAY_CHANGE = ("steps", "save_steps", "keep_checkpoints", "resume", "report_to", "progress",
                     "collective_timeout_s", "max_skipped_updates", "output_dir", "gradient_checkpointing",
                     "merge_lora")  # merge_lora: only what the end writes besides the adapter


class CheckpointError(OSError):
    """Writing a checkpoint or another output of the run failed on the file system (disk full, I/O)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the weights diverged); the last checkpoint is the place to resume from."""


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
    save_pretrained(run.accelerator.unwrap_model(run.model), run.tokenizer, path, model_sd)


def save_checkpoint(run, step: int, state: dict) -> Path | None:
    """Atomically write model (safetensors), tokenizer, optimizer, scheduler and trainer state (rank 0).
    A failure on the file system removes the temporary directory and raises CheckpointError."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = checkpoint_dir(run.out, step)
    if not weights_finite(run.model, acc, run.fsdp):
        raise TrainingError(f"refusing to checkpoint step {step}: the weights are not finite (diverged); "
                            f"{restart_hint(run.out)} with a lower lr")
    model_sd, optim_sd = full_state(run, optimizer=True)
    if acc.is_main_process:
        tmp = final.parent / f".tmp-{final.name}"
        with written_or_removed(tmp, f"writing checkpoint {final}"):
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(run, tmp, model_sd)
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
            replace_dir(tmp, final)
        prune_checkpoints(run.out, run.cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


class written_or_removed:
    """Context manager: an OSError (or safetensors' error) inside removes `tmp` (a directory or a file;
    None: nothing to remove) and becomes one CheckpointError naming `what` and the cause."""

    def __init__(self, tmp: Path, what: str):
        self.tmp, self.what = tmp, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not (isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"):
            return False
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True) if self.tmp.is_dir() else self.tmp.unlink(missing_ok=True)
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise CheckpointError(f"{self.what} failed: {cause}{where}") from exc


def restart_hint(out: Path) -> str:
    """Where a failed run goes on from: its latest complete checkpoint, or a fresh start when it has none."""
    last = latest_checkpoint(out)
    return f"resume from {last}" if last else "start again (no checkpoint yet)"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`. An existing `final` (a step saved again after a resume)
    is renamed aside to `.old-<name>` first and removed last, so a kill never leaves a half-deleted
    directory: at any instant the old or the new one is whole, under its real name or (between the two
    renames) as `.old-<name>`, which `recover_replaced` puts back at the next start."""
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_replaced(final: Path) -> None:
    """Finish or undo a replace_dir that a kill interrupted: `.old-<name>` goes back to `final` when `final`
    is missing, and is removed when `final` is there."""
    old = final.parent / f".old-{final.name}"
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True) if final.exists() else os.replace(old, final)


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_final_model(run) -> None:
    """output_dir/final: the HF model (LoRA: the adapter, and with merge_lora final/merged/) + tokenizer,
    atomically; every process calls it."""
    acc = run.accelerator
    model_sd, _ = full_state(run, optimizer=False)
    if acc.is_main_process:
        final, tmp = run.out / "final", run.out / ".tmp-final"
        with written_or_removed(tmp, f"writing the final model {final}"):
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(run, tmp, model_sd)
            if run.cfg.merge_lora:
                save_merged(run.accelerator.unwrap_model(run.model), run.tokenizer, tmp / "merged")
            replace_dir(tmp, final)
    acc.wait_for_everyone()


def write_summary(run, summary: dict) -> None:
    if run.accelerator.is_main_process:
        with written_or_removed(run.out / ".tmp-summary.json", f"writing {run.out / 'summary.json'}"):
            (run.out / ".tmp-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(run.out / ".tmp-summary.json", run.out / "summary.json")


# ---- loading ----------------------------------------------------------------------------------


def load_checkpoint(run, path: Path) -> dict:
    """Restore weights, optimizer and scheduler from `path`; returns its trainer state."""
    from safetensors.torch import load_file

    policy = run.accelerator.unwrap_model(run.model)
    state_dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        state_dict.update(_read(shard, load_file))
    optim_sd = _read(path / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    by_name = any(isinstance(k, str) for k in optim_sd.get("state", {}))  # keyed by name: written under FSDP
    if optim_sd.get("state") and by_name != run.fsdp:
        raise ConfigError(f"checkpoint {path} was written {'with' if by_name else 'without'} FSDP: its optimizer "
                          f"state resumes only {'with' if by_name else 'without'} FSDP")
    if run.fsdp:
        missing, unexpected = load_sharded(run, state_dict, optim_sd)
    elif is_peft_model(policy):
        missing, unexpected = load_adapter(policy, state_dict, path)
        run.optimizer.load_state_dict(optim_sd)
    else:
        missing, unexpected = policy.load_state_dict(state_dict, strict=False)
        run.optimizer.load_state_dict(optim_sd)
    missing = [k for k in missing if k not in _tied_keys(policy)]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    run.scheduler.load_state_dict(_read(path / "scheduler.pt", lambda f: torch.load(f, weights_only=True)))
    return _read(path / "trainer_state.json", lambda f: json.loads(f.read_text()))


def load_adapter(policy, state_dict: dict, path: Path) -> tuple[list[str], list[str]]:
    """Load a checkpoint's adapter weights into the PeftModel; (missing adapter keys, unexpected keys). A
    checkpoint without adapter weights (a full fine-tuning run's) is named here."""
    from peft import set_peft_model_state_dict

    if not any("lora_" in k for k in state_dict):
        raise ConfigError(f"checkpoint {path} holds no LoRA adapter (adapter_model.safetensors): it was not "
                          f"written by a LoRA run")
    result = set_peft_model_state_dict(policy, state_dict)
    missing = [k for k in result.missing_keys if "lora_" in k]
    return missing, list(result.unexpected_keys)


def _read(path: Path, load):
    """load(path), with any failure (missing, truncated, corrupt) as a ConfigError naming the file."""
    try:
        return load(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"checkpoint file {path} cannot be read ({type(exc).__name__}: {first}); remove "
                          f"{path.parent} to resume from the checkpoint before it") from None


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
    return {"runtime_s": 0.0, "step_time_s": 0.0, "tokens_processed": 0, "tokens_generated": 0, "rollout_s": 0.0,
            "skipped_updates": 0, "consecutive_skipped": 0, "rewards": []}


def prepare_output(run) -> tuple[int, dict, list[dict]]:
    """Create, restart or resume the run directory; returns (first step, accumulated state, the metrics
    lines of the steps already done). Every check runs before anything in the directory changes:
    - a directory with a complete checkpoint is resumed with --resume true, refused without it;
    - a directory with no complete checkpoint (the run stopped before its first one) starts again, its
      partial files replaced (said in one line);
    - a resume refuses changed run-defining fields (each named, old and new value) and a checkpoint
      beyond `steps`; a torn last metrics line (a kill while writing it) is dropped and said."""
    cfg, out = run.cfg, run.out
    if run.accelerator.is_main_process:  # a kill between replace_dir's renames leaves `.old-*` holding the data
        for old in [*(out / CHECKPOINTS).glob(".old-*"), out / ".old-final"]:
            recover_replaced(old.parent / old.name.removeprefix(".old-"))
    run.accelerator.wait_for_everyone()
    ckpt = latest_checkpoint(out)
    started = (out / "metrics.jsonl").exists() or (out / "summary.json").exists()
    if ckpt is not None and not cfg.resume:
        raise ConfigError(f"output_dir={str(out)!r} already holds a run; pass --resume true or choose another")
    state, kept = new_state(), []
    if ckpt is not None:
        check_resumable(cfg, out, ckpt)
        state.update(load_checkpoint(run, ckpt))
        kept = read_metrics(out / "metrics.jsonl", upto=int(state["step"]))
    elif started and run.accelerator.is_main_process:
        print(f"{out}: no complete checkpoint (the run stopped before its first one); starting it again, its "
              f"metrics and partial files replaced", file=sys.stderr, flush=True)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with written_or_removed(None, f"preparing the run directory {out}"):
            stale = [*(out / CHECKPOINTS).glob(".tmp-*"), out / ".tmp-final"] + ([] if ckpt else [out / "summary.json"])
            for path in stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            save_yaml(cfg, out / "config.yaml")
    run.accelerator.wait_for_everyone()
    return int(state.get("step", 0)), state, kept


def check_resumable(cfg, out: Path, ckpt: Path) -> None:
    """The saved config.yaml's run-defining fields equal cfg's, and the checkpoint is within `steps`."""
    saved_path = out / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else {}
    new = dataclasses.asdict(cfg)
    changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in new.items()
               if k in (saved or {}) and k not in RESUME_MAY_CHANGE and saved[k] != v]
    if changed:
        raise ConfigError(f"resume: {out} was trained with other settings; a resume must keep them "
                          f"(only {', '.join(RESUME_MAY_CHANGE)} may change):\n  " + "\n  ".join(changed))
    step = int(ckpt.name.split("-")[1])
    if step > cfg.steps:
        raise ConfigError(f"resume: the latest checkpoint {ckpt.name} is beyond steps={cfg.steps}")


def read_metrics(path: Path, upto: int) -> list[dict]:
    """The metrics lines of steps 1..upto. A torn last line is dropped (said on stderr); any other line
    that is not JSON is an error naming path:line."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"{path}:{i}: dropped a torn last line (the run was stopped while writing it)",
                      file=sys.stderr, flush=True)
                continue
            raise ConfigError(f"{path}:{i}: not a JSON metrics line; fix or remove it to resume") from None
        if m.get("step", 0) <= upto:
            kept.append(m)
    return kept

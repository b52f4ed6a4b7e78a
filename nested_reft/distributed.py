"""Several processes: the accelerator, FSDP2 sharding, reductions over processes, and failed collectives.

Choices:
- `accelerate` owns the process group (`accelerate launch` / `torchrun`, DDP by default): one
  `Accelerator` per run, CUDA when present, bf16 autocast on GPUs that support it (`bf16: auto`), and a
  collective timeout so that a dead or stalled peer fails the collectives instead of hanging.
- FSDP2 (`accelerate launch` with `distributed_type: FSDP` and `fsdp_version: 2`, i.e. the environment
  ACCELERATE_USE_FSDP=true FSDP_VERSION=2): we shard the model ourselves with torch's `fully_shard`, one
  unit per decoder layer plus the root (embeddings, final norm, LM head), on CPU (gloo; accelerate
  itself ignores FSDP there) and GPU alike. FSDP1 and CPU-RAM-efficient loading are refused up front.
- Reductions are explicit and small: `global_sum` of one scalar, `gather_rows` of a few per-process
  scalars, so that a metric reduced over N processes equals what one process reports for the same batch.
- A collective that fails (a peer died: gloo/NCCL errors; or stalled past `collective_timeout_s`) is
  turned into one `CollectiveError` that says what most likely happened and how to resume.
"""

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from nested_reft.config import ConfigError
from nested_reft.nested import find_layers


class CollectiveError(RuntimeError):
    """A collective across processes failed: a peer process died or stopped answering."""


def make_accelerator(device: str, bf16: str, collective_timeout_s: int):
    """The run's Accelerator: `device` auto/cpu/cuda, `bf16` auto/true/false (auto: CUDA GPUs with bf16)."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available")
    cpu = device == "cpu" or not torch.cuda.is_available()
    auto = not cpu and torch.cuda.is_bf16_supported()  # bf16 on GPUs that have it (not e.g. V100)
    on = str(bf16).lower() == "true" or (str(bf16).lower() == "auto" and auto)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))
    return Accelerator(cpu=cpu, mixed_precision="bf16" if on else "no", kwargs_handlers=[timeout])


def use_fsdp() -> bool:
    """Whether to shard: the launcher asked for FSDP and more than one process runs."""
    import torch.distributed as dist

    return fsdp_requested() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate's environment, readable before any process group
    exists); only FSDP2 is supported."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP: only fsdp_version: 2 (torch fully_shard) is supported, "
                          f"got FSDP_VERSION={os.environ.get('FSDP_VERSION', '1')}")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ConfigError("FSDP: fsdp_cpu_ram_efficient_loading is not supported (every process loads the "
                          "model, then shards it); set it to false")
    return True


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


def global_sum(acc, value: float) -> float:
    """`value` summed over processes (itself on one process)."""
    t = torch.tensor([float(value)], device=acc.device)
    return float(acc.reduce(t, "sum").item()) if acc.num_processes > 1 else float(value)


def gather_rows(acc, values: list[float]) -> torch.Tensor:
    """Local scalars [k] from every process as [world, k] (just [1, k] on one process)."""
    t = torch.tensor([values], dtype=torch.float64, device=acc.device)
    return acc.gather(t).cpu() if acc.num_processes > 1 else t.cpu()


def gather_tensor(acc, t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor concatenated over processes, on the CPU (itself on one process)."""
    return acc.gather(t.to(acc.device)).cpu() if acc.num_processes > 1 else t.cpu()


def full_tensor(t):
    """A DTensor (FSDP) gathered into a plain tensor; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def weights_finite(model, acc, fsdp: bool) -> bool:
    """All weights finite; under FSDP each process checks its shard and the verdict is all-reduced."""
    shards = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    local = all(bool(torch.isfinite(t).all()) for t in shards)
    return global_sum(acc, 0.0 if local else 1.0) == 0 if fsdp else local


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's own error types, or gloo/NCCL errors (gloo raises plain RuntimeErrors)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "Connection closed by peer",
                                                                       "Connection reset by peer"))


@contextmanager
def collective_failures(acc, timeout_s: int):
    """Turn a failed collective into a CollectiveError that says what most likely happened."""
    try:
        yield
    except RuntimeError as exc:
        if acc.num_processes < 2 or isinstance(exc, CollectiveError) or not is_collective_failure(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CollectiveError(
            f"process {acc.process_index} of {acc.num_processes}: a collective operation failed: another process "
            f"died or did not answer within collective_timeout_s={timeout_s} s (see its log). "
            f"This process stops too; resume from the last checkpoint with --resume true. "
            f"({type(exc).__name__}: {first})") from exc

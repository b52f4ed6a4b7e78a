"""`--compile`: torch.compile of the decoder layers for the RL update's teacher-forced passes.

Choices:
- Regional compilation, as PyTorch recommends for stacks of identical blocks: one compiled wrapper per
  decoder layer (`torch.compile(layer, dynamic=True)`), sharing the layer's parameters. Identical layers
  share one graph, so compiling costs about one layer's time, and micro-batches of every shape reuse it
  (dynamic shapes) instead of recompiling per length.
- Only the teacher-forced passes run compiled (pi_old, reference, the policy's forward and backward):
  `using_layers` swaps the wrappers into the decoder for the update and puts the plain layers back after
  it, also when it raises. The decode loop stays eager: its KV cache is a Python object per layer that
  the compiler guards on, and per-layer compiled decode hit dynamo's recompile limit and ran slower on CPU
  (docs/benchmarks.md). Checkpoints are written outside the swap, so their keys are the model's own.
- The wrappers live on the run, not in the model's module tree: state dicts, DDP's parameter list and the
  nested view (`skip_layers`) see only the plain layers. FSDP2 shards per layer and is refused with it.
- On CPU, inductor compiles C++: `check_compiler` refuses --compile before any work when torch finds no
  working C++ compiler (it would otherwise fail inside the first step).
- Values equal eager ones to float rounding (fused kernels sum in another order), not bit for bit; a
  resumed compiled run recompiles the same graphs and repeats itself.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nested_reft.nested import find_layers


def check_compiler(device_type: str) -> str | None:
    """Why torch.compile cannot run on this device type, or None. On CPU inductor needs a C++ compiler
    (torch._inductor.config.cpp.cxx, g++ by default); GPU kernels come from Triton instead."""
    if device_type != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or the search's own OSError
        return (f"compile=true on CPU needs a C++ compiler for torch.compile ({exc}); install one (for example "
                f"`apt install g++`, or set CXX) or drop --compile")
    return None


def compile_layers(model: nn.Module) -> nn.ModuleList:
    """One torch.compile'd wrapper (dynamic shapes) per decoder layer of `model`; compiled on first use."""
    return nn.ModuleList([torch.compile(layer, dynamic=True) for layer in find_layers(model).layers])


@contextmanager
def using_layers(model: nn.Module, layers: nn.ModuleList | None) -> Iterator[None]:
    """Inside the block `model`'s decoder runs `layers` (None: unchanged); its own list is restored after."""
    if layers is None:
        yield
        return
    found = find_layers(model)
    if len(layers) != len(found.layers):
        raise ValueError(f"{len(layers)} compiled layers for a decoder of {len(found.layers)}")
    setattr(found.owner, found.name, layers)
    try:
        yield
    finally:
        setattr(found.owner, found.name, found.layers)

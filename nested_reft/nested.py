"""skip_layers(): run an HF causal LM as its nested model, the same weights with some layers bypassed.

How: inside the `with` block the model *is* the smaller model made of the kept layers. The decoder's
layer list is swapped for a ModuleList holding the kept layers (the same module objects: no weight is
copied), the text config's `num_hidden_layers` and `layer_types` are shortened to match, and every
`layer_idx` inside the kept layers is renumbered 0..K-1. That last step is what keeps the KV cache
right: HF caches index their slots by `layer_idx` and read the sequence length from slot 0, so a
cache built under the block has exactly K slots and slot 0 is a layer that actually ran (also when
layer 0 is skipped). Sliding-window layers keep their own window and mask type.

Everything is restored in a `finally`, so the full model is bit-identical afterwards, also when the
block raises. A cache created inside the block belongs to the nested model; do not reuse it outside.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

# Attribute paths, from the model, of the decoder layer lists of the common HF families.
_LAYER_PATHS = (
    "model.layers",  # Qwen2/2.5/3, Llama, Mistral, Gemma, Phi-3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "layers",  # a bare decoder model (Qwen2Model, LlamaModel, ...)
)


class LayerList(NamedTuple):
    owner: nn.Module  # the module holding the layer list as an attribute
    name: str  # the attribute's name on `owner`
    layers: nn.ModuleList


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, object] | None:
    *parents, name = path.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner, name, getattr(owner, name, None)


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (PeftModel -> LoraModel -> the model, whose linear layers carry the
    injected adapters); any other model as it is. Its layers are the wrapper's layers: the same modules."""
    for _ in range(4):
        inner = model.get_base_model() if hasattr(type(model), "get_base_model") else None
        if inner is None or inner is model:
            return model
        model = inner
    return model


def find_layers(model: nn.Module) -> LayerList:
    """Locate the decoder's list of transformer blocks (through a PEFT wrapper: `unwrap_adapters`); a clear
    error when the model has none."""
    model = unwrap_adapters(model)
    for path in _LAYER_PATHS:
        found = _resolve(model, path)
        if found is not None and isinstance(found[2], nn.ModuleList) and len(found[2]) > 0:
            return LayerList(found[0], found[1], found[2])
    raise TypeError(
        f"{type(model).__name__} has no recognisable transformer layer list "
        f"(looked for {', '.join(_LAYER_PATHS)}); nested models need a decoder-only HF causal LM"
    )


def num_layers(model: nn.Module) -> int:
    """N, the number of transformer layers of the model."""
    return len(find_layers(model).layers)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (HF's per-layer hook, which stays on
    the layer modules, so it also holds while skip_layers() runs a nested model). transformers renamed gradient_checkpointing_enable to
    activation_checkpointing_enable; use the new name where it exists."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`; expected a Hugging Face model")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_skip(skip: Sequence[int], n: int, model_name: str = "model") -> tuple[int, ...]:
    """Validate a skip set against N layers; returns it sorted. Errors name the offending index."""
    skip = tuple(int(i) for i in skip)
    for i in skip:
        if not 0 <= i < n:
            raise IndexError(f"skip index {i} is out of range for {model_name} with {n} layers")
    if len(set(skip)) != len(skip):
        repeated = sorted({i for i in skip if skip.count(i) > 1})
        raise ValueError(f"skip set repeats layer index {repeated[0]}: {skip}")
    if len(skip) == n:
        raise ValueError(f"skip set {skip} removes all {n} layers of {model_name}")
    return tuple(sorted(skip))


#: Config fields a nested view shortens to its kept layers.
NESTED_FIELDS = ("num_hidden_layers", "layer_types")


def nesting_problem(model: nn.Module) -> str | None:
    """Why `model`'s nested view cannot be built (None when it can): a config field it must shorten is a
    read-only property computed from other fields (Jamba's and Bamba's `layer_types` in transformers 5.25)."""
    return config_nesting_problem(text_config(model), type(model).__name__)


def config_nesting_problem(config, model_name: str) -> str | None:
    """nesting_problem from a (text) config alone, before any weights are loaded."""
    for key in NESTED_FIELDS:
        name = getattr(type(config), "attribute_map", {}).get(key, key)
        prop = getattr(type(config), name, None)
        if isinstance(prop, property) and prop.fset is None:
            return (f"{model_name} cannot be nested: its config's `{key}` is computed from other fields "
                    f"(read-only), so a nested model's layer list cannot be set; use it with skip ratio 0")
    return None


def _layer_idx_holders(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]


@contextmanager
def skip_layers(model: nn.Module, skip: Sequence[int]) -> Iterator[nn.Module]:
    """Inside the block, `model` runs as its nested model with the layers in `skip` bypassed.

    The residual stream passes a skipped layer unchanged (it is simply not called). Weights are
    shared, nothing is copied; an empty `skip` leaves the model exactly as it is.
    """
    found = find_layers(model)
    full = found.layers
    skip = check_skip(skip, len(full), type(model).__name__)
    if not skip:
        yield model
        return
    if problem := nesting_problem(model):
        raise ValueError(problem)
    config = text_config(model)
    kept = [i for i in range(len(full)) if i not in set(skip)]
    saved_idx = [(m, m.layer_idx) for i in kept for m in _layer_idx_holders(full[i])]
    saved_cfg = {k: getattr(config, k) for k in NESTED_FIELDS if hasattr(config, k)}
    try:
        for new, old in enumerate(kept):
            for m in _layer_idx_holders(full[old]):
                m.layer_idx = new
        if saved_cfg.get("layer_types") is not None:
            config.layer_types = [saved_cfg["layer_types"][i] for i in kept]
        config.num_hidden_layers = len(kept)
        setattr(found.owner, found.name, nn.ModuleList([full[i] for i in kept]))
        yield model
    finally:
        setattr(found.owner, found.name, full)
        for key, value in saved_cfg.items():
            setattr(config, key, value)
        for m, idx in saved_idx:
            m.layer_idx = idx


@torch.no_grad()
def build_truncated_model(model: nn.Module, skip: Sequence[int]) -> nn.Module:
    """An explicitly built smaller model holding copies of the kept layers only (a reference for tests
    and for users who want a standalone nested checkpoint). Unlike skip_layers, this copies weights."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    n = len(find_layers(model).layers)
    skip = check_skip(skip, n, type(model).__name__)
    if problem := nesting_problem(model):
        raise ValueError(problem)
    kept = [i for i in range(n) if i not in set(skip)]
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[i] for i in kept]
    text.num_hidden_layers = len(kept)
    small = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    state = model.state_dict()
    prefix = f"{_prefix(model, find_layers(model))}."
    new_state = {}
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            idx, tail = rest.split(".", 1)
            if int(idx) in skip:
                continue
            key = f"{prefix}{kept.index(int(idx))}.{tail}"
        new_state[key] = value.clone()
    small.load_state_dict(new_state, strict=True)
    return small.to(next(model.parameters()).device).eval()


def _prefix(model: nn.Module, found: LayerList) -> str:
    for name, module in model.named_modules():
        if module is found.layers:
            return name
    raise TypeError(f"layer list of {type(model).__name__} is not a submodule")

"""Hugging Face causal LMs and tokenizers for every command: loading with clear errors, the checks that
catch a bad model directory before any work, dropout, and saving.

Choices:
- One loader for train, sft, eval and layers: `AutoTokenizer` + `AutoModelForCausalLM`. Whatever stops a
  model from loading (a missing directory, a bad config, a truncated model.safetensors, an unknown hub id)
  is a ConfigError naming the model and the cause, never a traceback.
- The tokenizer must be real. From a directory without tokenizer files `AutoTokenizer` builds an empty
  tokenizer that encodes every prompt to nothing; we refuse it at load time instead of at the first
  rollout. The pad token falls back to EOS (the usual choice for decoder-only models).
- Dropout is switched off in the policy by default, as TRL's `disable_dropout`: rollouts and pi_old run in
  eval mode and the update in train mode, so dropout would add noise to rho. `nn.Dropout` modules get
  p = 0 and the attention-dropout rates HF attention reads from its modules and config are set to 0.
- A saved model keeps `use_cache: true` in its config (training turns the cache off while it runs), so
  that a user loading it for inference gets the KV cache.
- LoRA (peft, optional: `pip install -e ".[peft]"`): `apply_lora` wraps the loaded model in a PeftModel
  whose adapters (rank r, scaling alpha/r, B = 0 so the wrapped model starts equal to the base) are the only
  trainable parameters; the adapter init is seeded. Every target module must exist in the model and be a
  linear layer (peft itself ignores a target that matches nothing as long as another one matches). An
  adapter's `base_model_name_or_path` is the absolute path of the model it was trained on (a relative one
  would break as soon as the directory is read from elsewhere).
- A model directory holding a LoRA adapter (adapter_config.json, no config.json: what `sft` or `train`
  write with --lora-r) loads as its base (`base_model_name_or_path`, itself possibly an adapter) with the
  adapter merged in, so every command takes the adapter directory as `--model`.
- `merged_state_dict` gives the weights of base + adapter (W + (alpha/r) B A, peft's own delta) under the
  base model's names without touching the training model, so a merged copy can be written at the end
  while the adapter keeps training or checkpointing.
"""

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from nested_reft.config import ConfigError


def load_model_and_tokenizer(name: str, dtype=torch.float32):
    """(model, tokenizer) from a directory or hub id; ConfigError naming `name` and the cause. A LoRA
    adapter directory loads as its base model with the adapter merged in (`is_adapter_dir`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter_dir(name):
        return load_merged_adapter(name, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as exc:  # OSError, ValueError, SafetensorError, ...: one line naming the cause
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model={name!r} does not load: {type(exc).__name__}: {first}") from None
    check_tokenizer(name, tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_tokenizer(name: str, tokenizer, model) -> None:
    """The tokenizer has a vocabulary, encodes text, fits the model's embeddings and has pad or EOS."""
    probe = tokenizer("What is 1 + 1?", add_special_tokens=False)["input_ids"]
    if len(tokenizer) < 2 or not probe:
        files = sorted(p.name for p in Path(name).iterdir()) if Path(name).is_dir() else []
        raise ConfigError(f"model={name!r}: its tokenizer is empty (no tokenizer files? the directory holds "
                          f"{', '.join(files) or 'nothing'}); save the tokenizer next to the model")
    vocab = model.get_input_embeddings().num_embeddings
    if max(probe) >= vocab:
        raise ConfigError(f"model={name!r}: the tokenizer gives token id {max(probe)} but the model has only "
                          f"{vocab} embeddings; tokenizer and model do not belong together")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(f"model={name!r}: its tokenizer has neither a pad nor an EOS token")


def disable_dropout(model: nn.Module) -> int:
    """Switch every dropout module and attention-dropout rate of the model off (the modules only, as TRL's
    disable_dropout_in_model: model.config, and so every checkpoint, keeps the model's own rates);
    returns how many rates were non-zero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        for attr in ("attention_dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0:
                setattr(module, attr, 0.0)
                changed += 1
    return changed


def save_pretrained(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """model.save_pretrained (safetensors) + tokenizer, with use_cache on in the saved config."""
    config = model.config
    cache = getattr(config, "use_cache", None)
    config.use_cache = True
    try:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    finally:
        config.use_cache = cache
    tokenizer.save_pretrained(path)


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (one or a list; 0 is an id like any other) and the
    tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def context_length(model) -> int | None:
    """The model's max_position_embeddings, if its config has one."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


# ---- LoRA (peft) ------------------------------------------------------------------------------


def require_peft(what: str) -> None:
    """ConfigError naming `what` (e.g. "lora_r=8") when peft cannot be imported."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(f'{what} needs the peft package: pip install -e ".[peft]"') from None


def is_adapter_dir(name) -> bool:
    """A local directory holding a peft adapter and no full model config."""
    path = Path(name)
    return path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_merged_adapter(name: str, dtype=torch.float32):
    """(base model with the adapter of directory `name` merged in, the tokenizer saved with the adapter)."""
    import json

    require_peft(f"model={name!r} (a LoRA adapter)")
    from peft import PeftModel
    from transformers import AutoTokenizer

    try:
        base_name = json.loads((Path(name) / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model={name!r}: adapter_config.json has no readable base_model_name_or_path "
                          f"({type(exc).__name__}: {exc})") from None
    if not base_name:
        raise ConfigError(f"model={name!r}: adapter_config.json names no base model (base_model_name_or_path)")
    try:
        base, _ = load_model_and_tokenizer(base_name, dtype)
    except ConfigError as exc:
        raise ConfigError(f"model={name!r} is a LoRA adapter whose base model does not load: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name) if (Path(name) / "tokenizer_config.json").is_file() else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(base_name)
        with _quiet_peft():
            model = PeftModel.from_pretrained(base, name).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base for inference; as a --model it is trained
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model={name!r} (a LoRA adapter on {base_name!r}) does not load: "
                          f"{type(exc).__name__}: {first}") from None
    check_tokenizer(name, tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextmanager
def _quiet_peft():
    """Silence peft's warnings that say nothing to our users: it reads transformers' deprecated
    `is_gradient_checkpointing`, and warns that base_model_name_or_path differs from the model's name_or_path
    (apply_lora sets the one it means)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*renamed.*")
        yield


def _lora_compatible(module: nn.Module) -> bool:
    """A module type LoRA can adapt: linear layers (incl. GPT-2's Conv1D) and embeddings."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D))


def check_lora_targets(model: nn.Module, targets) -> list[str]:
    """Errors for target module names that match no module of `model` (peft matches a name or a dotted
    suffix of one) or only modules LoRA cannot adapt; an empty list when all are fine."""
    errors, names = [], [(n, m) for n, m in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in names if isinstance(m, nn.Linear)})
    for target in targets:
        found = [m for n, m in names if n == target or n.endswith("." + target)]
        if not found:
            errors.append(f"lora_target_modules: {target!r} is not a module of the model (its linear layers: "
                          f"{', '.join(linear)})")
        elif not any(_lora_compatible(m) for m in found):
            errors.append(f"lora_target_modules: {target!r} is a {type(found[0]).__name__}, not a linear layer "
                          f"(its linear layers: {', '.join(linear)})")
    return errors


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets, seed: int, base_name: str):
    """The model wrapped in a peft PeftModel with LoRA adapters on `targets` (only they are trainable). The
    adapters' random init (A; B starts at 0) is drawn from a generator seeded with `seed`, leaving the global
    RNG untouched. ConfigError for a bad target. `base_name` goes into adapter_config.json (absolute if local)."""
    require_peft(f"lora_r={r}")
    from peft import LoraConfig, get_peft_model

    errors = check_lora_targets(model, targets)
    if errors:
        from nested_reft.config import invalid

        raise ConfigError(invalid(errors))
    base = str(Path(base_name).absolute()) if Path(base_name).is_dir() else base_name
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets), bias="none", base_model_name_or_path=base)
    with torch.random.fork_rng(devices=[]), _quiet_peft():
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as exc:  # a target peft cannot adapt
            raise ConfigError(f"lora_target_modules={list(targets)}: {exc}") from None
    wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped


def is_peft_model(model) -> bool:
    """Whether `model` is a peft PeftModel (LoRA); False without peft installed."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: all of them, or with LoRA only the adapters'."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA adapter merged in (W + (alpha/r) B A, on the CPU), under
    the names of a plain HF model (what `merge_and_unload` would leave), without changing `model`."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    lora = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    for name, m in lora.items():
        if getattr(m, "lora_variant", {}).get("default") is not None or getattr(m, "lora_bias", {}).get("default"):
            raise ValueError(f"merged_state_dict: {name} is not a plain LoRA layer")
    out, copies = {}, {}
    for key, value in inner.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue  # tied weights stay one tensor, so that save_pretrained writes them once
        if value.data_ptr() not in copies:
            copies[value.data_ptr()] = value.detach().to("cpu", copy=True)
        out[key.replace(".base_layer.", ".")] = copies[value.data_ptr()]
    for name, m in lora.items():
        weight = out[f"{name}.weight"]
        out[f"{name}.weight"] = weight + m.get_delta_weight("default").to("cpu", weight.dtype)
    return out


@contextmanager
def merged_adapters(model: nn.Module):
    """Within the block every plain LoRA layer of `model` computes with its adapter folded into a temporary copy
    of its base weight (W + (alpha/r) B A, in W's dtype) and the adapter bypassed: one product where the
    adapter path takes three. Layers whose base weight is shared (a tied head) keep their adapter. On exit the
    base weights are the original tensors again (bit for bit) and the adapters are back as they were.
    Costs one temporary copy of every adapted weight, in the base weights' dtype."""
    from peft.tuners.lora import LoraLayer

    shared = {id(model.get_input_embeddings().weight)} if hasattr(model, "get_input_embeddings") else set()
    swapped = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not isinstance(m, LoraLayer) or m.disable_adapters or m.merged:
                    continue
                base = m.get_base_layer()
                names = [name for name in m.active_adapters if name in m.lora_A]
                if not names:
                    continue
                plain = all(getattr(m, "lora_variant", {}).get(name) is None and not getattr(m, "lora_bias", {}).get(name)
                            for name in names)  # no DoRA-like variant, no adapter bias
                if not plain or id(base.weight) in shared or not hasattr(m, "get_delta_weight"):
                    continue
                weight = base.weight.data
                with torch.autocast(weight.device.type, enabled=False):  # B A in the adapters' own precision
                    delta = sum(m.get_delta_weight(name) for name in names)
                swapped.append((m, base, weight))
                base.weight.data = (weight.float() + delta.float()).to(weight.dtype)  # rounded once
                m._disable_adapters = True  # peft's enable_adapters(False) would also switch requires_grad off
        yield len(swapped)
    finally:
        for m, base, weight in swapped:
            base.weight.data = weight
            m._disable_adapters = False


def save_merged(model, tokenizer, path: Path) -> None:
    """A plain HF model (base + adapter merged, `merged_state_dict`) and the tokenizer in `path`, loadable
    with AutoModelForCausalLM.from_pretrained."""
    save_pretrained(model.get_base_model(), tokenizer, path, merged_state_dict(model))

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
"""

from pathlib import Path

import torch
from torch import nn

from nested_reft.config import ConfigError


def load_model_and_tokenizer(name: str, dtype=torch.float32):
    """(model, tokenizer) from a directory or hub id; ConfigError naming `name` and the cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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

"""Configuration: dataclasses whose fields carry a one-line doc, a YAML file and command-line flags that
compose (defaults < YAML < flags), and validation that names every bad value before any work starts.

Choices:
- A field is declared with `doc(default, "help")`; the same text is the `--help` of its flag, whose
  spelling is the field name with dashes (`skip_ratio` -> `--skip-ratio`).
- Flags default to None in argparse so that only flags the user typed override the YAML.
- Unknown YAML keys are errors (with the closest known key suggested), never silently ignored.
- Errors are collected, not raised one by one: the user sees every bad field at once.
"""

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """One or more invalid configuration values; the message lists each field and what is allowed."""


def doc(default, help: str, **kwargs):
    """A dataclass field with a one-line doc (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(tp):
    """int for `int | None`, list for `list[float]` ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _elem_type(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    args = typing.get_args(tp)
    return args[0] if args else str


def add_arguments(parser, cls, skip=()) -> None:
    """Add one `--field-name` flag per dataclass field (default None: only typed flags override)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        base = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "default" not in help_text and default not in ("", None):
            help_text = f"{help_text} (default: {default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, default=None, type=_parse_bool, metavar="{true,false}",
                                nargs="?", const=True, help=help_text)  # a bare `--kl` means true
        elif base is list:
            parser.add_argument(flag, dest=f.name, default=None, nargs="+", type=_elem_type(hints[f.name]),
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=base if base in (int, float) else str,
                                help=help_text)


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _coerce(name: str, value, tp):
    """Check/convert one YAML value to the field's type; raises ConfigError naming the field."""
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if base is list:
            elem = _elem_type(tp)
            return [elem(v) for v in (value if isinstance(value, list) else [value])]
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value}")
        if base in (int, float, str):
            if isinstance(value, bool) and base is not str:
                raise ValueError(f"expected a number, got {value}")
            return base(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    return value


def resolve(cls, yaml_path=None, overrides: dict | None = None):
    """Build `cls` from its defaults, then a YAML file, then non-None `overrides` (the typed flags)."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = read_yaml(yaml_path) if yaml_path else {}
    errors = []
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            errors.append(f"unknown field {key!r} in {yaml_path}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    values = {k: v for k, v in values.items() if k in names}
    values.update({k: v for k, v in (overrides or {}).items() if k in names and v is not None})
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key] = _coerce(key, value, hints[key])
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError(invalid(errors))
    return cls(**coerced)


def check_choice(errors: list, name: str, value, allowed) -> None:
    if value not in allowed:
        errors.append(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_range(errors: list, name: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """Append an error unless value is a finite number with low <= value <= high (low < value when
    low_open, value < high when high_open). NaN and infinities never pass (`nan <= 0` is False)."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    bad = not finite or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        rng = " and ".join(p for p in (lo, hi) if p)
        errors.append(f"{name}={value!r} must be " + ("a finite number " if not finite else "") + rng)


def check_finite_floats(errors: list, cfg) -> None:
    """Append an error for every float field of the dataclass `cfg` that is NaN or infinite (unless the
    same field already has an error)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value) and not any(e.startswith(f"{f.name}=") for e in errors):
            errors.append(f"{f.name}={value!r} must be a finite number")


def output_dir_problems(path: Path) -> list[str]:
    """Why `path` cannot become an output directory (nothing is created): it or a parent is a file, or the
    nearest existing parent is not writable. An empty list when it can."""
    path = Path(path).expanduser().absolute()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                return [f"output_dir={str(path)!r}: {parent} exists and is not a directory"]
            if not os.access(parent, os.W_OK | os.X_OK):
                return [f"output_dir={str(path)!r}: {parent} is not writable (permission denied)"]
            return []
    return []


def invalid(errors: list[str]) -> str:
    """The message of a ConfigError: one line for one bad field, a line per field for several."""
    if len(errors) == 1:
        return f"invalid configuration: {errors[0]}"
    return f"invalid configuration ({len(errors)} fields):\n  " + "\n  ".join(errors)


def raise_if(errors: list) -> None:
    if errors:
        raise ConfigError(invalid(errors))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


#: LoRA's default targets: the attention and MLP projections of Qwen2/2.5/3, Llama, Mistral (every linear
#: layer of a decoder block; not the embeddings or the LM head).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_HELP = {
    "lora_r": "LoRA rank r: > 0 trains rank-r adapters only (peft; the base weights stay frozen), 0 = full fine-tuning",
    "lora_alpha": "LoRA alpha: the adapter's update is scaled by alpha/r (default: 2*r, a scaling of 2 at every "
                  "rank, so a learning rate carries over when r changes)",
    "lora_target_modules": "module names (or dotted suffixes) that get adapters (default: the attention and MLP "
                           "projections of Qwen/Llama)",
    "merge_lora": "also write base + adapter merged into one plain HF model, in a merged/ directory next to the "
                  "final adapter",
}


def check_lora(e: list, cfg) -> None:
    """The LoRA fields of a TrainConfig or SFTConfig: lora_r >= 0; with lora_r > 0, lora_alpha > 0, lora_dropout
    in [0, 1) and at least one target; with lora_r = 0 (LoRA off) every other LoRA field must keep its default
    (a value there would be silently ignored)."""
    check_range(e, "lora_r", cfg.lora_r, 0)
    if isinstance(cfg.lora_r, int) and cfg.lora_r > 0:
        check_range(e, "lora_alpha", cfg.lora_alpha, 0.0, low_open=True)
        check_range(e, "lora_dropout", cfg.lora_dropout, 0.0, 1.0, high_open=True)
        if not cfg.lora_target_modules:
            e.append("lora_target_modules is empty: name at least one module to adapt")
        return
    if cfg.lora_r != 0:
        return
    off = "is used only with LoRA (lora_r > 0; lora_r=0 is full fine-tuning)"
    if cfg.lora_alpha is not None:
        e.append(f"lora_alpha={cfg.lora_alpha!r} {off}")
    if cfg.lora_dropout != 0.0:
        e.append(f"lora_dropout={cfg.lora_dropout!r} {off}")
    if list(cfg.lora_target_modules or []) != LORA_TARGET_MODULES:
        e.append(f"lora_target_modules={cfg.lora_target_modules!r} {off}")
    if cfg.merge_lora:
        e.append("merge_lora=True needs LoRA (lora_r > 0); without it the final model is already a full HF model")


def resolve_lora_alpha(cfg) -> None:
    """lora_alpha's default, 2 * lora_r, filled in when LoRA is on (left None when it is off)."""
    if cfg.lora_alpha is None and isinstance(cfg.lora_r, int) and not isinstance(cfg.lora_r, bool) and cfg.lora_r > 0:
        cfg.lora_alpha = 2.0 * cfg.lora_r


PAPER_MITIGATIONS = ("base", "practical", "retrace")  # what demo and sweep run by default
MITIGATIONS = PAPER_MITIGATIONS + ("tis", "mis")  # tis, mis: beyond the paper (objectives.py)
IS_LEVELS = ("token", "sequence")
SKIP_POLICIES = ("uniform", "importance", "fixed")  # layer_skip.py
LOSS_TYPES = ("bnpo", "grpo", "dr_grpo")


def check_nested_fields(e: list, cfg, policies=SKIP_POLICIES) -> None:
    """The Nested-ReFT fields any config carries (TrainConfig, integrations.trl.NestedGRPOConfig): skip ratio,
    border, skip policy and its settings, mitigation and its caps, IS level; appends to `e`."""
    check_range(e, "skip_ratio", cfg.skip_ratio, 0.0, 0.99)
    if isinstance(cfg.border, bool) or not isinstance(cfg.border, int):
        e.append(f"border={cfg.border!r} must be an integer >= 0")
    else:
        check_range(e, "border", cfg.border, 0)
    check_choice(e, "mitigation", cfg.mitigation, MITIGATIONS)
    check_choice(e, "skip_policy", cfg.skip_policy, policies)
    check_range(e, "skip_temperature", cfg.skip_temperature, 0.0, low_open=True)
    if cfg.skip_policy == "fixed" and not cfg.skip_layers:
        e.append("skip_policy=fixed needs skip_layers (the layer indices to skip every step)")
    if cfg.skip_layers is not None and cfg.skip_policy != "fixed":
        e.append(f"skip_layers={cfg.skip_layers} is used only by skip_policy=fixed (got {cfg.skip_policy!r})")
    if cfg.skip_layers and len(set(cfg.skip_layers)) != len(cfg.skip_layers):
        e.append(f"skip_layers={cfg.skip_layers} repeats a layer")
    check_range(e, "lam", cfg.lam, 0.0, low_open=True)
    check_range(e, "is_cap", cfg.is_cap, 0.0, low_open=True)
    if cfg.is_cap_low is not None:
        check_range(e, "is_cap_low", cfg.is_cap_low, 0.0, low_open=True)
    caps_ok = not any(x.startswith(("is_cap=", "is_cap_low=")) for x in e)
    if caps_ok and cfg.is_cap_low is not None and cfg.is_cap_low > cfg.is_cap:
        e.append(f"is_cap_low={cfg.is_cap_low!r} must be <= is_cap={cfg.is_cap!r}")
    elif caps_ok and cfg.mitigation == "mis" and cfg.is_cap_low is None and cfg.is_cap < 1:
        e.append(f"is_cap={cfg.is_cap!r} < 1 with is_cap_low unset (1/is_cap = {1 / cfg.is_cap:g} > is_cap) "
                 "leaves mis no ratio to keep; set is_cap_low <= is_cap")
    check_choice(e, "is_level", cfg.is_level, IS_LEVELS)


@dataclasses.dataclass
class TrainConfig:
    """The Nested-ReFT RL stage (Algorithm 1, step 2). Defaults follow the paper (SPEC section 2)."""

    model: str = doc("", "model directory or hub id to fine-tune (usually the SFT checkpoint)")
    dataset: str = doc("gsm8k", "training set: gsm8k, svamp, math12k, toy, a .jsonl path or a hub id")
    data_dir: str | None = doc(None, "directory in the shared data layout (default: $NESTED_REFT_DATA)")
    split: str = doc("train", "split of the training set to read")
    limit: int | None = doc(None, "use only the first N training examples")
    template: str = doc("auto", "prompt template: auto (chat when the tokenizer has one), chat or plain")
    output_dir: str = doc("runs/train", "run directory: config, metrics, checkpoints")
    skip_ratio: float = doc(0.0, "x: fraction of the N layers the behaviour model skips (0 = plain ReFT)")
    border: int | None = doc(None, "b: the first and last b layers are never skipped (default: 1 if skip_ratio > 0, else 0)")
    mitigation: str = doc("base", "importance weight h_m: base (rho), practical (1), retrace (lam*min(1,rho)), "
                                  "tis (min(rho,C)) or mis (rho if C_low<=rho<=C, else 0)")
    skip_policy: str = doc("uniform", "which layers a nested model skips: uniform (the paper's draw), importance "
                                      "(less important layers more often) or fixed (skip_layers every step)")
    skip_temperature: float = doc(0.1, "T of the importance policy: p_i ~ exp(-I_i / (mean I * T)); small T skips "
                                       "the least important layers almost always")
    profile_every: int = doc(1, "importance policy: refresh the layer profile (Block Influence) from the update's "
                                "forward pass every N steps")
    skip_layers: list[int] | None = doc(None, "the fixed policy's layer indices (exactly U of them, none in the border)")
    lam: float = doc(1.0, "lambda of retrace; must be > 0")
    is_cap: float = doc(2.0, "C of tis and mis: the cap on rho; must be > 0")
    is_cap_low: float | None = doc(None, "C_low of mis: smaller rho are masked (default: 1/is_cap)")
    is_level: str = doc("token", "importance ratio per token or per sequence (sequence: high variance)")
    num_generations: int = doc(8, "G completions per prompt (>= 2 for group advantages)")
    max_new_tokens: int = doc(256, "completion length cap")
    min_new_tokens: int | None = doc(None, "EOS suppressed before this many tokens (default: max_new_tokens, fixed length as the paper)")
    temperature: float = doc(1.0, "rollout sampling temperature T (> 0)")
    top_p: float = doc(1.0, "rollout nucleus mass")
    top_k: int = doc(0, "rollout top-k (0 = off)")
    logprobs: str = doc("sampled", "behaviour log-probs: sampled (recorded while sampling) or recompute")
    steps: int = doc(99, "S: RL gradient steps")
    batch_size: int = doc(16, "prompts per step (reached by gradient accumulation)")
    micro_batch_size: int = doc(4, "prompts per forward/backward pass: its untrimmed tokens bound each packed pass (batching.py)")
    rollout_batch_size: int = doc(16, "prompts per generation call")
    lr: float = doc(1e-6, "AdamW learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    lr_scheduler: str = doc("linear", "learning-rate schedule after warm-up: linear, cosine or constant")
    warmup_ratio: float = doc(0.0, "fraction of the steps spent warming the learning rate up")
    max_grad_norm: float = doc(1.0, "gradient clipping norm (0 = off)")
    num_iterations: int = doc(1, "updates per rollout batch; > 1 enables the PPO-clipped surrogate")
    epsilon: float = doc(0.2, "PPO clip range (used when num_iterations > 1)")
    beta: float = doc(0.0, "KL coefficient to a frozen reference (0: no reference model is loaded)")
    loss_type: str = doc("bnpo", "loss aggregation: bnpo, grpo or dr_grpo")
    scale_rewards: str = doc("group", "advantage scaling: group (divide by group std) or none (Dr. GRPO)")
    seed: int = doc(0, "seeds data order, skip sets, sampling and initialisation")
    save_steps: int = doc(50, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = doc(2, "how many step checkpoints to keep")
    resume: bool = doc(False, "continue from the latest checkpoint in output_dir")
    report_to: str = doc("none", "extra logging: none, tensorboard or wandb")
    device: str = doc("auto", "auto (CUDA when present), cpu or cuda")
    bf16: str = doc("auto", "bfloat16 autocast: auto (on CUDA GPUs that support it), true or false")
    gradient_checkpointing: bool = doc(False, "recompute activations in the backward pass to save memory")
    compile: bool = doc(False, "torch.compile the decoder layers for the update's passes (not FSDP; the decode loop "
                               "stays eager, see cuda_graphs)")
    cuda_graphs: bool = doc(False, "replay the rollouts' one-token decode steps from CUDA graphs (CUDA, full-attention "
                                   "models, not FSDP; docs/rollout.md)")
    progress: bool = doc(True, "show a progress bar")
    collective_timeout_s: int = doc(600, "seconds before a stalled collective (dead peer process) aborts the run")
    disable_dropout: bool = doc(True, "switch the policy's dropout off (rollouts and pi_old run without it; TRL's default)")
    max_skipped_updates: int = doc(10, "stop with an error after this many consecutive skipped (non-finite) updates")
    lora_r: int = doc(0, LORA_HELP["lora_r"])
    lora_alpha: float | None = doc(None, LORA_HELP["lora_alpha"])
    lora_dropout: float = doc(0.0, "dropout on the adapters' input; > 0 needs disable_dropout=false (the default "
                                   "disable_dropout switches every dropout of the policy off, the adapters' too)")
    lora_target_modules: list[str] = doc(LORA_TARGET_MODULES, LORA_HELP["lora_target_modules"])
    merge_lora: bool = doc(False, LORA_HELP["merge_lora"] + " (final/merged/)")
    lora_merge_rollouts: bool = doc(False, "with LoRA, sample rollouts from base + adapter folded into temporary "
                                           "weights (faster decoding, a temporary copy of every adapted weight; "
                                           "behaviour log-probs then differ from the adapter path by rounding)")

    def __post_init__(self):
        if self.border is None:
            self.border = 1 if self.skip_ratio and self.skip_ratio > 0 else 0
        if self.min_new_tokens is None:
            self.min_new_tokens = self.max_new_tokens
        resolve_lora_alpha(self)

    def validate(self) -> None:
        """Check every field that needs no model or data; raises ConfigError listing all problems."""
        e: list[str] = []
        if not self.model:
            e.append("model is required (a model directory or hub id)")
        check_nested_fields(e, self)
        check_range(e, "profile_every", self.profile_every, 1)
        check_range(e, "num_generations", self.num_generations, 2)
        check_range(e, "max_new_tokens", self.max_new_tokens, 1)
        check_range(e, "min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        check_range(e, "temperature", self.temperature, 0.0, low_open=True)
        check_range(e, "top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range(e, "top_k", self.top_k, 0)
        check_choice(e, "logprobs", self.logprobs, ("sampled", "recompute"))
        check_choice(e, "template", self.template, ("auto", "chat", "plain"))
        for name in ("steps", "batch_size", "micro_batch_size", "rollout_batch_size", "num_iterations",
                     "save_steps", "keep_checkpoints", "collective_timeout_s", "max_skipped_updates"):
            check_range(e, name, getattr(self, name), 1)
        if self.batch_size % max(self.micro_batch_size, 1):
            e.append(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}")
        check_range(e, "lr", self.lr, 0.0, low_open=True)
        for name in ("weight_decay", "max_grad_norm", "epsilon", "beta"):
            check_range(e, name, getattr(self, name), 0.0)
        check_range(e, "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        for name in ("adam_beta1", "adam_beta2"):
            check_range(e, name, getattr(self, name), 0.0, 1.0, high_open=True)
        check_choice(e, "lr_scheduler", self.lr_scheduler, ("linear", "cosine", "constant"))
        check_choice(e, "loss_type", self.loss_type, LOSS_TYPES)
        check_choice(e, "scale_rewards", self.scale_rewards, ("group", "none"))
        check_choice(e, "report_to", self.report_to, ("none", "tensorboard", "wandb"))
        check_choice(e, "bf16", str(self.bf16).lower(), ("auto", "true", "false"))
        if self.limit is not None:
            check_range(e, "limit", self.limit, 1)
        check_lora(e, self)
        if self.lora_merge_rollouts and self.lora_r == 0:
            e.append("lora_merge_rollouts=true needs LoRA adapters (lora_r > 0)")
        if (self.disable_dropout and isinstance(self.lora_dropout, (int, float)) and self.lora_dropout > 0
                and not any(x.startswith("lora_") for x in e)):
            e.append(f"lora_dropout={self.lora_dropout!r} would be switched off by disable_dropout=true (the default: "
                     "dropout in the update but not in the rollouts adds noise to rho); pass --disable-dropout false "
                     "to train with adapter dropout")
        if self.is_level == "sequence" and self.mitigation != "practical":
            import warnings

            warnings.warn("is_level=sequence: the importance ratio is a product over the whole completion, whose "
                          "variance grows with its length (high variance); token level is the default", stacklevel=2)
        check_finite_floats(e, self)
        raise_if(e)

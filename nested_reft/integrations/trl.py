"""Nested-ReFT in TRL: `NestedGRPOConfig` and `NestedGRPOTrainer`, a `trl.GRPOTrainer` whose rollouts come from
the step's nested model (the policy with a few transformer layers skipped) and whose loss carries the h_m weights.

    from nested_reft.integrations.trl import NestedGRPOConfig, NestedGRPOTrainer
    args = NestedGRPOConfig(output_dir="out", skip_ratio=0.15, mitigation="retrace")
    NestedGRPOTrainer(model="Qwen/Qwen2.5-Math-1.5B-Instruct", reward_funcs=reward, args=args,
                      train_dataset=dataset).train()

Tested with TRL 1.16 only (`pip install -e ".[trl]"`); another version is refused, because the trainer hooks into
three of GRPOTrainer's internal methods. docs/trl.md is the user's page. Choices:

- What changes (transformers generation path, `use_vllm=False`): `_generate_single_turn` samples every row of the
  generation batch (TRL has already repeated each prompt `num_generations` times) with our rollout engine
  (`nested_reft.rollout.generate`) on the nested model, and returns the behaviour log-probs of the distribution
  each token was drawn from; TRL stores them as `sampling_per_token_logps`. The skip set of a generation is
  `skip_set_at(N, skip_ratio, border, seed, state.global_step, skip_policy, ...)`: the function `nested-reft
  train` draws its step's set with, at the index of the optimizer step (completed optimizer steps), so step s of a
  TRL run skips the layers step s of `nested-reft train` with the same seed skips, on every process and after a
  resume. Evaluation generates at full depth. Each row samples from its own CPU generator seeded by (seed, step,
  its position in the global generation batch), so the samples do not depend on the number of processes.
- pi_old at full depth: with one generation per optimizer step and one iteration (required when skip_ratio > 0),
  TRL skips its pi_old pass and uses the policy's own detached log-probs of the training forward; so do we, as
  `nested-reft train` does: h comes from that forward (no extra pass). When TRL computes `old_per_token_logps`
  (skip_ratio = 0 with num_iterations > 1 or steps_per_generation != gradient_accumulation_steps), h uses them.
- h is `nested_reft.objectives.importance_weights` (base / practical / retrace / tis / mis, token or sequence level),
  the function `nested-reft train` uses, and it enters TRL's loss as per-token advantages A * h: TRL's
  `_compute_loss` accepts [B, T] advantages, and because h >= 0 every supported loss type is positively
  homogeneous in A token by token (-min(c1 A h, c2 A h) = -h min(c1 A, c2 A) for grpo/bnpo/dr_grpo/dapo/luspo;
  cispo and sapo are linear in A, and sapo's sign test sees the sign of A wherever h > 0), so this is exactly
  `per_token_loss * h`, TRL's own placement of its vLLM IS correction, with the KL term unweighted (also as TRL
  and `nested-reft train`). It needs no flag flipping inside TRL and no extra forward pass. `vespo` builds its own
  IS weighting and is refused with skip_ratio > 0. h is computed inside `_compute_loss`, right after TRL's policy
  forward returns (a hook on `_get_per_token_logps_and_entropies`, which TRL 1.16 calls before it reads the
  advantages; a RuntimeError says so if a TRL change ever breaks that order).
- With skip_ratio = 0 and mitigation practical the loss and gradient are TRL's exactly (h = 1); with base, retrace,
  tis or mis they equal TRL's to fp32 rounding (rho = 1 up to the engine's log-prob rounding, ~1e-7).
- Metrics go through TRL's own store (`self._metrics`, averaged by `log()`), gathered over processes first:
  `nested/num_skipped`, `nested/skip_first`, `nested/skip_last`, `nested/rollout_s` per generation;
  `nested/h_{mean,min,max}`, `nested/h_{truncated,capped,masked}_frac`, `nested/log_ratio_mean`,
  `sampling/importance_sampling_ratio/{min,mean,max}` (= h), `sampling/sampling_logp_difference/{mean,max}` and
  `rollout_corr/*` (objectives.finish_offpolicy) per generation batch, accumulated over its micro-batches.
- Refused with a ValueError naming the field, before any model is loaded: use_vllm with skip_ratio > 0 (vLLM
  cannot run the nested model yet), steps_per_generation != gradient_accumulation_steps or num_iterations != 1 with
  skip_ratio > 0 (one skip set per optimizer step), sampling settings our engine does not reproduce (min_p,
  repetition_penalty, generation_kwargs: h would be biased), continuous batching, tools, rollout_func, environments,
  vision-language models, skip_policy importance (`nested-reft train` only: it measures Block Influence in the
  update's forward pass), and every bad value of the new fields.
"""

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch

from nested_reft.config import ConfigError, check_choice, check_nested_fields, check_range, invalid

SUPPORTED_TRL = ">=1.16,<1.17"
_SUPPORTED_RELEASE = (1, 16)
INSTALL_HINT = 'pip install -e ".[trl]"  (from the nested-reft checkout; or: pip install "trl>=1.16,<1.17")'


def _version_problem(version: str) -> str | None:
    """Why TRL `version` is not supported (None when it is)."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(str(version)).release[:2]
    except InvalidVersion:
        release = None
    if release == _SUPPORTED_RELEASE:
        return None
    return (f"nested_reft.integrations.trl supports TRL {SUPPORTED_TRL} (tested with 1.16.0); TRL {version} is "
            f"installed. Install a supported version with: {INSTALL_HINT}")


def check_trl_version(version: str | None = None) -> None:
    """RuntimeError naming the supported versions when the installed TRL (or `version`) is outside them."""
    if version is None:
        import trl

        version = getattr(trl, "__version__", "unknown")
    problem = _version_problem(version)
    if problem:
        raise RuntimeError(problem)


try:
    import trl as _trl
except ImportError as _exc:  # tests/test_integrations_trl.py::test_trl_missing
    raise ImportError(f"nested_reft.integrations.trl needs TRL {SUPPORTED_TRL}, which is not installed: "
                      f"{INSTALL_HINT}") from _exc
if _version_problem(getattr(_trl, "__version__", "unknown")):
    raise ImportError(_version_problem(getattr(_trl, "__version__", "unknown")))

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.extras.profiling import profiling_context  # noqa: E402
from trl.models import unwrap_model_for_generation  # noqa: E402

from nested_reft.layer_skip import check_fixed_skip_set, check_skip_config, skip_set_at  # noqa: E402
from nested_reft.nested import config_nesting_problem, find_layers, nesting_problem  # noqa: E402
from nested_reft.objectives import combine_offpolicy, finish_offpolicy, importance_weights, offpolicy_sums  # noqa: E402
from nested_reft.rollout import SamplingConfig, generate  # noqa: E402

__all__ = ["NestedGRPOConfig", "NestedGRPOTrainer", "check_trl_version", "SUPPORTED_TRL", "TRL_SKIP_POLICIES"]

#: Skip policies the TRL trainer supports (`importance` needs the layer profile `nested-reft train` measures).
TRL_SKIP_POLICIES = ("uniform", "fixed")
#: generation_kwargs keys that do not change the sampling distribution (anything else is refused).
_HARMLESS_GENERATION_KWARGS = ("use_cache", "cache_implementation", "disable_compile")
#: GRPOTrainer.__init__'s parameters, to find tools / processing_class however they were passed
_GRPO_INIT_SIGNATURE = inspect.signature(GRPOTrainer.__init__)
#: TRL loss types h can be folded into (vespo weights by its own IS ratio).
_H_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class NestedGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` plus the Nested-ReFT fields (the names and meanings of `nested-reft train`'s flags)."""

    skip_ratio: float = field(default=0.0, metadata=_help(
        "x: fraction of the N transformer layers the rollout (behaviour) model skips; 0 = full-depth rollouts"))
    border: int = field(default=1, metadata=_help("b: the first and last b layers are never skipped"))
    mitigation: str = field(default="retrace", metadata=_help(
        "importance weight h: base (rho), practical (1), retrace (lam*min(1,rho)), tis (min(rho,C)), "
        "mis (rho if C_low<=rho<=C else 0); rho = pi_old(full depth) / behaviour(nested)"))
    lam: float = field(default=1.0, metadata=_help("lambda of retrace; > 0"))
    is_level: str = field(default="token", metadata=_help("importance ratio per token or per sequence"))
    is_cap: float = field(default=2.0, metadata=_help("C of tis and mis; > 0"))
    is_cap_low: float | None = field(default=None, metadata=_help("C_low of mis (default 1/is_cap)"))
    skip_policy: str = field(default="uniform", metadata=_help(
        "uniform (the paper's draw) or fixed (skip_layers every step); importance is `nested-reft train` only"))
    skip_temperature: float = field(default=0.1, metadata=_help("T of the importance policy (train only); > 0"))
    skip_layers: list[int] | None = field(default=None, metadata=_help(
        "the fixed policy's layer indices (exactly U = round(N * skip_ratio) of them, none in the border)"))

    def __post_init__(self):
        check_trl_version()
        errors = self.nested_field_errors()
        if errors:
            raise ConfigError(invalid(errors))
        if self.is_level == "sequence" and self.mitigation != "practical":
            warnings.warn("is_level=sequence: the importance ratio is a product over the whole completion, whose "
                          "variance grows with its length; token level is the default", stacklevel=2)
        super().__post_init__()
        errors = self.nested_batch_errors()
        if errors:
            raise ConfigError(invalid(errors))

    @property
    def uses_nested_engine(self) -> bool:
        """Rollouts come from our engine (the transformers path); with use_vllm (skip_ratio 0 only) TRL's vLLM."""
        return not self.use_vllm

    def nested_field_errors(self) -> list[str]:
        """Problems of the Nested-ReFT fields and of the TRL settings they rule out (needs no model)."""
        e: list[str] = []
        if self.skip_policy == "importance":
            e.append("skip_policy='importance' is supported by `nested-reft train` only (it measures each layer's "
                     "Block Influence in the update's forward pass); use 'uniform' or 'fixed' here")
        check_nested_fields(e, self, policies=TRL_SKIP_POLICIES + ("importance",))
        ratio_ok = not any(x.startswith("skip_ratio=") for x in e)
        if ratio_ok and self.use_vllm and self.skip_ratio > 0:
            e.append(f"use_vllm=True with skip_ratio={self.skip_ratio} > 0 is not supported yet: vLLM would sample "
                     "from the full model, not the nested one. Set use_vllm=False (transformers generation path) "
                     "or skip_ratio=0")
        if self.uses_nested_engine:
            if self.min_p not in (None, 0, 0.0):
                e.append(f"min_p={self.min_p!r}: the nested rollout engine samples with temperature, top_k and top_p "
                         "only; min-p sampling would bias the importance weights. Unset min_p")
            if self.repetition_penalty != 1.0:
                e.append(f"repetition_penalty={self.repetition_penalty!r}: the nested rollout engine does not apply "
                         "a repetition penalty (the importance weights would be biased); use 1.0")
            kwargs = self.generation_kwargs
            if isinstance(kwargs, dict):
                bad = sorted(k for k in kwargs if k not in _HARMLESS_GENERATION_KWARGS)
                if bad:
                    e.append(f"generation_kwargs: {', '.join(bad)} cannot be reproduced by the nested rollout engine "
                             "(temperature, top_k, top_p, max_completion_length only); remove them")
            elif kwargs:
                e.append(f"generation_kwargs={kwargs!r} cannot be reproduced by the nested rollout engine; remove it")
            check_range(e, "temperature", self.temperature, 0.0, low_open=True)
            if self.use_transformers_continuous_batching:
                e.append("use_transformers_continuous_batching=True: NestedGRPOTrainer samples with its own engine "
                         "on the transformers path; set it to False")
        if ratio_ok and self.skip_ratio > 0 and self.loss_type not in _H_LOSS_TYPES:
            e.append(f"loss_type={self.loss_type!r} cannot take the importance weights h (vespo weights by its own "
                     f"importance ratio); use one of {', '.join(_H_LOSS_TYPES)} with skip_ratio > 0")
        return e

    def nested_batch_errors(self) -> list[str]:
        """One skip set per optimizer step: needs steps_per_generation == gradient_accumulation_steps and
        num_iterations == 1 when skip_ratio > 0 (checked once GRPOConfig has resolved steps_per_generation)."""
        e: list[str] = []
        if self.skip_ratio > 0:
            if self.steps_per_generation != self.gradient_accumulation_steps:
                e.append(f"steps_per_generation={self.steps_per_generation} must equal gradient_accumulation_steps="
                         f"{self.gradient_accumulation_steps} with skip_ratio > 0 (one rollout, and one skip set, "
                         "per optimizer step); leave steps_per_generation and generation_batch_size unset")
            if self.num_iterations != 1:
                e.append(f"num_iterations={self.num_iterations} must be 1 with skip_ratio > 0 (one skip set per "
                         "optimizer step)")
        return e


def _base_model(model):
    """The transformers model under a PEFT wrapper (adapters stay active in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _num_layers_before_loading(model, args) -> int | None:
    """N from a model object or the config of a model path/id (no weights loaded); None if it cannot be read.
    At skip_ratio > 0, a model whose nested view cannot be built (nested.nesting_problem) is refused here."""
    if isinstance(model, str):
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        except Exception:  # let GRPOTrainer report a model that does not load
            return None
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        problem = config_nesting_problem(text, name)
        n = int(text.num_hidden_layers)
    else:
        try:
            n = len(find_layers(_base_model(model)).layers)
        except TypeError as exc:
            raise ValueError(f"NestedGRPOTrainer: {exc}") from None
        problem = nesting_problem(_base_model(model))
    if args.skip_ratio > 0 and problem:
        raise ValueError(f"NestedGRPOTrainer: {problem}")
    return n


def _check_skip(args: NestedGRPOConfig, n: int) -> None:
    """U must fit the valid layers; a fixed set must be U valid layers (ValueError naming the field)."""
    try:
        check_skip_config(n, args.skip_ratio, args.border)
        if args.skip_policy == "fixed":
            check_fixed_skip_set(n, args.skip_ratio, args.border, args.skip_layers)
    except ValueError as exc:
        raise ConfigError(invalid([f"{exc} (the model has {n} layers)"])) from None


def _row_generators(seed: int, step: int, first_row: int, rows: int, salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per row, seeded by (seed, step, the row's position in the global generation batch)."""
    base = (seed * 1_000_003 + step) * 100_003 + salt * 7_919_993
    return [torch.Generator().manual_seed(base + first_row + k + 1) for k in range(rows)]


class NestedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with rollouts from the step's nested model and h_m-weighted per-token loss (module doc).

    Takes GRPOTrainer's arguments; `args` must be a `NestedGRPOConfig` (None builds a default one).
    `skip_history` maps each optimizer step that generated training rollouts to the skip set it used.
    """

    _tag_names = ["trl", "grpo", "nested-reft"]

    def __init__(self, model, reward_funcs=None, args: NestedGRPOConfig | None = None, *more, **kwargs):
        check_trl_version()
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = NestedGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-NestedGRPO")
        if not isinstance(args, NestedGRPOConfig):
            raise TypeError(f"NestedGRPOTrainer needs args=NestedGRPOConfig(...), got {type(args).__name__}; "
                            "NestedGRPOConfig takes every GRPOConfig field plus skip_ratio, border, mitigation, ...")
        # fields may have been changed after the config was built: check them all again, before any work
        errors = args.nested_field_errors() + args.nested_batch_errors()
        if errors:
            raise ConfigError(invalid(errors))
        bound = _GRPO_INIT_SIGNATURE.bind(self, model, reward_funcs, args, *more, **kwargs)
        given = bound.arguments
        if args.uses_nested_engine:
            for name in ("tools", "rollout_func", "environment_factory"):
                if given.get(name):
                    raise ValueError(f"NestedGRPOTrainer: {name} is not supported (rollouts come from the nested "
                                     "engine, single turn); use trl.GRPOTrainer for tool use and custom rollouts")
            processing_class = given.get("processing_class")
            if processing_class is not None and not hasattr(processing_class, "convert_tokens_to_ids"):
                raise ValueError("NestedGRPOTrainer: vision-language models (a processor as processing_class) are "
                                 "not supported; the nested rollout engine is text-only")
        n = _num_layers_before_loading(model, args)
        if n is not None:
            _check_skip(args, n)

        self.skip_history: dict[int, tuple[int, ...]] = {}
        self._nested_pending = None  # the inputs dict of the _compute_loss call waiting for its h
        self._nested_acc = None  # metric pieces of the current generation batch's micro-batches
        self._nested_parts = 0
        self._nested_eval_calls = 0
        super().__init__(model, reward_funcs, args, *more, **kwargs)

        if not args.uses_nested_engine:
            return
        if self.is_fsdp_enabled and _base_model(self.model) is not self.model:
            raise ValueError("NestedGRPOTrainer: a PEFT model under FSDP is not supported (the rollout engine runs "
                             "the model inside the PEFT wrapper, whose FSDP unit would not gather its parameters); "
                             "use DDP for LoRA runs")
        if self._is_vlm:
            raise ValueError("NestedGRPOTrainer: vision-language models are not supported; the nested rollout "
                             "engine is text-only")
        try:
            self.nested_num_layers = len(find_layers(_base_model(self.accelerator.unwrap_model(self.model))).layers)
        except TypeError as exc:
            raise ValueError(f"NestedGRPOTrainer: {exc}") from None
        _check_skip(args, self.nested_num_layers)
        self._sampling = SamplingConfig(temperature=float(self.temperature), top_p=float(self.top_p),
                                        top_k=int(self.top_k or 0), max_new_tokens=int(self.max_completion_length),
                                        min_new_tokens=0, logprobs="sampled")
        self._sampling.validate()
        if args.skip_ratio > 0 and not args.disable_dropout and _has_dropout(self.model):
            warnings.warn("NestedGRPOTrainer: the model has dropout and disable_dropout=False: pi_old is scored in "
                          "train mode, so rho and h carry dropout noise; set disable_dropout=True", stacklevel=2)

    # ---- the skip set ---------------------------------------------------------------------------------------

    def skip_set_for_step(self, step: int) -> tuple[int, ...]:
        """The layers the nested model of optimizer step `step` (0-based) skips: `skip_set_at`, as `nested-reft
        train` draws its step's set (seed = args.seed)."""
        a = self.args
        return skip_set_at(self.nested_num_layers, a.skip_ratio, a.border, a.seed, step, a.skip_policy, None,
                           a.skip_temperature, a.skip_layers)

    # ---- rollouts ----------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self.args.uses_nested_engine:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if multimodal_fields or (images is not None and any(x for x in images)):
            raise ValueError("NestedGRPOTrainer: image inputs are not supported by the nested rollout engine")
        mode = "train" if self.model.training else "eval"
        step = self.state.global_step
        if mode == "train":
            skip = self.skip_set_for_step(step)
            self.skip_history[step] = skip
            gens = _row_generators(self.args.seed, step, self.accelerator.process_index * len(prompt_ids),
                                   len(prompt_ids))
        else:  # evaluation: full depth, its own seeds
            skip = ()
            self._nested_eval_calls += 1
            gens = _row_generators(self.args.seed, step, self.accelerator.process_index * len(prompt_ids),
                                   len(prompt_ids), salt=self._nested_eval_calls)
        all_done = None
        if self.accelerator.num_processes > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            # sharded forwards are collectives: every process decodes until all are done (rollout.py)
            def all_done(done: bool) -> bool:
                flag = torch.tensor([0.0 if done else 1.0], device=self.accelerator.device)
                return float(self.accelerator.reduce(flag, reduction="sum")) == 0.0
        with (
            profiling_context(self, "nested.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            self.accelerator.autocast(),  # the policy forward's precision, as `nested-reft train` samples
        ):
            rollout = generate(_base_model(unwrapped_model), prompt_ids, 1, self._sampling, self.eos_token_ids,
                               self._tokenizer.pad_token_id, skip=skip, generator=gens, all_done=all_done)
        ids, mask, logps = (t.cpu() for t in (rollout.completion_ids, rollout.completion_mask,
                                                rollout.behavior_logprobs))
        completion_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        logprobs = [row[m.bool()].tolist() for row, m in zip(logps, mask)]
        metrics = self._metrics[mode]
        metrics["nested/num_skipped"].append(float(len(skip)))
        if skip:
            metrics["nested/skip_first"].append(float(skip[0]))
            metrics["nested/skip_last"].append(float(skip[-1]))
        elapsed = torch.tensor([rollout.rollout_s], device=self.accelerator.device)
        metrics["nested/rollout_s"].append(float(self.accelerator.gather(elapsed).max()))
        return completion_ids, logprobs  # TRL pads the log-probs into inputs["sampling_per_token_logps"]

    # ---- h into the loss ---------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if not self.args.uses_nested_engine:
            return super()._compute_loss(model, inputs)
        if "sampling_per_token_logps" not in inputs:
            raise RuntimeError("NestedGRPOTrainer: the batch has no behaviour log-probs (sampling_per_token_logps); "
                               "it was not generated by NestedGRPOTrainer")
        inputs = dict(inputs)  # the buffered batch stays as TRL stored it
        self._nested_pending = inputs
        try:
            loss = super()._compute_loss(model, inputs)
            missed = self._nested_pending is not None
        finally:
            self._nested_pending = None
        if missed:
            raise RuntimeError("NestedGRPOTrainer: TRL's _compute_loss did not score the policy through "
                               "_get_per_token_logps_and_entropies, so h was not applied; this TRL version is "
                               f"not supported ({SUPPORTED_TRL})")
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args,
                                                         **kwargs)
        inputs = self._nested_pending
        if inputs is not None:
            self._nested_pending = None
            self._apply_h(inputs, out[0])
        return out

    def _apply_h(self, inputs: dict, per_token_logps: torch.Tensor) -> None:
        """Replace inputs["advantages"] by A * h [B, T] (module doc) and record the h and off-policy pieces."""
        a = self.args
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        target = inputs.get("old_per_token_logps")
        target = per_token_logps.detach() if target is None else target  # pi_old at full depth
        behaviour = inputs["sampling_per_token_logps"]
        if behaviour.shape != target.shape:
            raise RuntimeError(f"NestedGRPOTrainer: behaviour log-probs {tuple(behaviour.shape)} do not match the "
                               f"policy's {tuple(target.shape)}")
        h, hm = importance_weights(target, behaviour, mask, a.mitigation, a.lam, a.is_level, cap=a.is_cap,
                                   cap_low=a.is_cap_low)
        adv = inputs["advantages"]
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        inputs["advantages"] = adv * h.to(device=adv.device, dtype=adv.dtype)
        self._record(hm, offpolicy_sums(target, behaviour, mask, a.is_cap))

    # ---- metrics -----------------------------------------------------------------------------------------------

    def _record(self, hm: dict, offp) -> None:
        n = hm["num_units"]
        piece = [n, hm["h_mean"] * n, hm["h_truncated_frac"] * n, hm["h_capped_frac"] * n, hm["h_masked_frac"] * n,
                 hm["log_ratio_mean"] * n, hm["h_min"] if n else math.inf, hm["h_max"] if n else -math.inf]
        if self._nested_acc is None:
            self._nested_acc = (piece, offp)
        else:
            acc, acc_offp = self._nested_acc
            summed = [x + y for x, y in zip(acc[:6], piece[:6])] + [min(acc[6], piece[6]), max(acc[7], piece[7])]
            self._nested_acc = (summed, combine_offpolicy([acc_offp, offp]))
        self._nested_parts += 1
        mode = "train" if self.model.training else "eval"
        if mode == "eval" or self._nested_parts >= self.args.steps_per_generation:
            self._flush(mode)

    def _flush(self, mode: str) -> None:
        """Gather this generation batch's pieces over processes and append the metrics to TRL's store."""
        piece, offp = self._nested_acc
        self._nested_acc, self._nested_parts = None, 0
        local = torch.tensor([piece + list(offp)], dtype=torch.float64, device=self.accelerator.device)
        rows = self.accelerator.gather(local).view(-1, local.size(1)).cpu()  # [world, 8 + 12]
        units = float(rows[:, 0].sum())
        m = self._metrics[mode]
        if units > 0:
            h_mean = float(rows[:, 1].sum()) / units
            h_min, h_max = float(rows[:, 6].min()), float(rows[:, 7].max())
            values = {"nested/h_mean": h_mean, "nested/h_min": h_min, "nested/h_max": h_max,
                      "nested/h_truncated_frac": float(rows[:, 2].sum()) / units,
                      "nested/h_capped_frac": float(rows[:, 3].sum()) / units,
                      "nested/h_masked_frac": float(rows[:, 4].sum()) / units,
                      "nested/log_ratio_mean": float(rows[:, 5].sum()) / units,
                      "sampling/importance_sampling_ratio/min": h_min,
                      "sampling/importance_sampling_ratio/mean": h_mean,
                      "sampling/importance_sampling_ratio/max": h_max}
            for key, value in values.items():
                m[key].append(value)
        for key, value in finish_offpolicy(combine_offpolicy(rows[:, 8:].tolist())).items():
            m[key].append(float(value))


def _has_dropout(model) -> bool:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        for attr in ("attention_dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0:
                return True
    return False

"""Layer importance: how much each transformer layer matters to the model, measured on a calibration batch.

Two measures, both over the batch's target tokens (mask == 1):
- **Block Influence** (BI, as ShortGPT): 1 - cos(input, output) of a layer's hidden states, averaged over
  tokens. One full-depth forward pass gives it for every layer (forward hooks on the decoder layers), so
  it is also measured, at the cost of a few reductions, inside any other full-depth forward pass
  (`InfluenceMeter`: the trainer uses the RL update's own forward pass).
- **Per-token KL(full || nested)** over the vocabulary at temperature 1, with the nested model run
  through skip_layers (one pass per skip set): the cost of skipping that set, in nats per token.

Choices: hidden states and cosines in float32; a layer whose output is a tuple contributes its first
element (the hidden states); with activation checkpointing a layer's hook also fires in the backward
recompute, which adds the same values again and so leaves the mean unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nested_reft.config import check_range, doc, output_dir_problems, raise_if
from nested_reft.nested import find_layers, skip_layers


class InfluenceMeter:
    """Accumulates Block Influence sums of every decoder layer over the forward passes run while it is
    open. `mask` [B, L] (set before each forward with `set_mask`) selects the tokens that count."""

    def __init__(self, model):
        self.layers = list(find_layers(model).layers)
        self.sums = torch.zeros(len(self.layers), dtype=torch.float64)  # [N], moved to the hidden states' device
        self.counts = torch.zeros(len(self.layers), dtype=torch.float64)  # [N]
        self.mask = None
        self.handles = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # [B, L, H]
            y = output[0] if isinstance(output, tuple) else output  # [B, L, H]
            with torch.no_grad():
                cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)  # [B, L]
                # a 0/1 weight, not a boolean index: indexing needs the count on the host (a sync per layer on CUDA)
                keep = torch.ones_like(cos) if self.mask is None else (self.mask != 0).to(cos.device, cos.dtype)
                if self.sums.device != cos.device:  # accumulate where the model runs: no sync per layer
                    self.sums, self.counts = self.sums.to(cos.device), self.counts.to(cos.device)
                self.sums[i] += ((1.0 - cos) * keep).double().sum()
                self.counts[i] += keep.double().sum()
        return hook

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False

    def values(self) -> list[float]:
        """BI per layer (0 for a layer that saw no token)."""
        return (self.sums / self.counts.clamp(min=1)).cpu().tolist()


@torch.no_grad()
def block_influence(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                    batch_size: int = 8) -> list[float]:
    """BI of every layer [N] over the `mask` [B, L] tokens of one full-depth forward pass per mini-batch."""
    meter = InfluenceMeter(model)
    with meter:
        for i in range(0, input_ids.size(0), batch_size):
            sl = slice(i, i + batch_size)
            meter.set_mask(mask[sl])
            model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], use_cache=False)
    return meter.values()


def _logprobs(model, input_ids, attention_mask, batch_size):
    out = []
    for i in range(0, input_ids.size(0), batch_size):
        logits = model(input_ids=input_ids[i:i + batch_size], attention_mask=attention_mask[i:i + batch_size],
                       use_cache=False).logits  # [b, L, V]
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)  # [B, L, V]


@torch.no_grad()
def skip_kl(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
            skip_sets: list[tuple[int, ...]], batch_size: int = 8) -> list[float]:
    """Mean per-token KL(full || nested with `skip` skipped) over the positions whose next token is a
    target (mask [B, L] of the targets, shifted by one), one value per skip set."""
    pred = torch.zeros_like(mask, dtype=torch.bool)  # [B, L]: position t predicts token t + 1
    pred[:, :-1] = mask[:, 1:].bool()
    full = _logprobs(model, input_ids, attention_mask, batch_size)[pred]  # [T, V]
    out = []
    for skip in skip_sets:
        with skip_layers(model, skip):
            nested = _logprobs(model, input_ids, attention_mask, batch_size)[pred]  # [T, V]
        kl = (full.exp() * (full - nested)).sum(-1)  # [T]
        out.append(float(kl.double().mean()) if kl.numel() else 0.0)
    return out


@contextmanager
def measuring(model, enabled: bool):
    """An open InfluenceMeter on `model`, or None when not enabled."""
    if not enabled:
        yield None
        return
    with InfluenceMeter(model) as meter:
        yield meter


# ---- the `layers` command ----------------------------------------------------------------------


@dataclass
class LayersConfig:
    model: str = doc("", "model directory or hub id")
    dataset: str = doc("gsm8k", "calibration data set (its problems with their reference solutions, teacher-forced)")
    completions: str | None = doc(None, "calibrate on given completions instead: a JSONL file of {problem or prompt, "
                                        "completion} records (eval's samples.jsonl qualifies); --dataset is then unused")
    data_dir: str | None = doc(None, "data root in the shared layout (default: $NESTED_REFT_DATA)")
    split: str = doc("train", "split of the data set")
    limit: int = doc(64, "calibration examples (the first N)")
    max_length: int = doc(512, "prompt + solution tokens per example (cut beyond)")
    template: str = doc("auto", "prompt template: auto (chat if the tokenizer has one), chat, plain")
    batch_size: int = doc(8, "examples per forward pass")
    border: int = doc(1, "b: the first and last b layers (marked in the chart) are not skip candidates")
    kl: bool = doc(False, "also the per-token KL(full || without layer i) of each layer (one pass per layer)")
    skip_layers: list[int] | None = doc(None, "report the KL of this whole skip set")
    output_dir: str | None = doc(None, "write layers.json and layers.png here (default: write nothing)")

    def validate(self) -> None:
        e: list[str] = []
        if not self.model:
            e.append("model is required (a directory or hub id)")
        for name in ("limit", "max_length", "batch_size"):
            check_range(e, name, getattr(self, name), 1)
        check_range(e, "border", self.border, 0)
        if self.skip_layers is not None and len(set(self.skip_layers)) != len(self.skip_layers):
            e.append(f"skip_layers={self.skip_layers} repeats a layer")
        if self.output_dir:
            e += output_dir_problems(Path(self.output_dir))
        if self.completions and not Path(self.completions).is_file():
            e.append(f"completions={self.completions!r} does not exist")
        raise_if(e)


def read_completions(path: str, limit: int) -> list[tuple[str, str, bool]]:
    """(prompt text, completion, templated) of the first `limit` records of a JSONL file: `problem` is put
    through the prompt template, `prompt` is used as it is. Errors name file:line and the field."""
    import json

    from nested_reft.config import ConfigError

    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if len(records) == limit:
            break
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        key = "problem" if isinstance(r, dict) and isinstance(r.get("problem"), str) else "prompt"
        if not isinstance(r, dict) or not isinstance(r.get(key), str) or not isinstance(r.get("completion"), str):
            raise ConfigError(f"{path}:{number}: expected an object with string fields 'completion' and "
                              f"'problem' or 'prompt'")
        records.append((r[key], r["completion"], key == "problem"))
    return records


def calibration_batch(cfg: LayersConfig, tokenizer) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and the target-token mask [B, L], right-padded, of the first `limit`
    calibration examples: the data set's problems with their reference solutions (the SFT targets), or
    the given completions after their prompts."""
    from nested_reft.config import ConfigError
    from nested_reft.data import DataError, encode_prompt, load_examples, resolve_template, sft_target
    from nested_reft.sft import build_example, collate

    source = f"completions={cfg.completions!r}" if cfg.completions else f"dataset={cfg.dataset!r}"
    try:
        template = resolve_template(tokenizer, cfg.template)
        if cfg.completions:
            pairs = [(encode_prompt(tokenizer, text, template) if templated else
                      tokenizer(text, add_special_tokens=False)["input_ids"], completion)
                     for text, completion, templated in read_completions(cfg.completions, cfg.limit)]
        else:
            pairs = [(encode_prompt(tokenizer, ex.problem, template), sft_target(ex, cfg.dataset))
                     for ex in load_examples(cfg.dataset, cfg.split, cfg.data_dir, cfg.limit)]
        items = [build_example(tokenizer, prompt, target, cfg.max_length) for prompt, target in pairs]
    except DataError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not items:
        raise ConfigError(f"{source} has no examples")
    batch = collate(items, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "mask": batch["labels"] != -100}


def profile_model(model, batch: dict, cfg: LayersConfig) -> dict:
    """The report: BI per layer, optionally the KL of each single layer and of the given skip set."""
    from nested_reft.layer_skip import valid_layers
    from nested_reft.nested import check_skip

    n = len(find_layers(model).layers)
    ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["mask"]
    report = {"model": cfg.model, "dataset": cfg.completions or cfg.dataset, "examples": int(ids.size(0)),
              "target_tokens": int(mask.sum()), "num_layers": n, "border": cfg.border,
              "valid_layers": valid_layers(n, cfg.border),
              "block_influence": block_influence(model, ids, att, mask, cfg.batch_size)}
    if cfg.kl:
        report["kl"] = skip_kl(model, ids, att, mask, [(i,) for i in range(n)], cfg.batch_size)
    if cfg.skip_layers:
        skip = check_skip(cfg.skip_layers, n, cfg.model)
        report["skip_layers"] = list(skip)
        report["skip_set_kl"] = skip_kl(model, ids, att, mask, [skip], cfg.batch_size)[0]
    return report


def format_layers(report: dict) -> str:
    """The table on stdout: one row per layer."""
    valid = set(report["valid_layers"])
    head = f"{'layer':>5}  {'BI':>8}" + (f"  {'KL':>8}" if "kl" in report else "") + "  skip candidate"
    rows = [head]
    for i, bi in enumerate(report["block_influence"]):
        kl = f"  {report['kl'][i]:8.4f}" if "kl" in report else ""
        rows.append(f"{i:>5}  {bi:8.4f}{kl}  {'yes' if i in valid else 'no (border)'}")
    if "skip_set_kl" in report:
        rows.append(f"KL(full || without {report['skip_layers']}) = {report['skip_set_kl']:.4f} nats/token")
    return "\n".join(rows)


def plot_layers(report: dict, path: Path) -> None:
    """Bar chart: layers on the x axis, BI (and KL) as bars, border layers shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, b = report["num_layers"], report["border"]
    x = list(range(n))
    panels = [("Block Influence (1 - cos)", report["block_influence"])]
    if "kl" in report:
        panels.append(("KL(full || without layer), nats/token", report["kl"]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, n * 0.35), 2.8 * len(panels)), squeeze=False)
    for ax, (label, values) in zip(axes[:, 0], panels):
        ax.bar(x, values, color=["#bbbbbb" if i < b or i >= n - b else "#3a7bd5" for i in x])
        if b:
            ax.axvspan(-0.5, b - 0.5, color="#f3d3d3", zorder=0)
            ax.axvspan(n - b - 0.5, n - 0.5, color="#f3d3d3", zorder=0, label=f"border (b = {b})")
            ax.legend(loc="upper center", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xticks(x)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(f"{Path(report['model']).name}: layer importance on {report['examples']} {report['dataset']} examples",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_layers(cfg: LayersConfig, model) -> None:
    """The border and the skip set against the model's N layers (ConfigError naming the value)."""
    from nested_reft.config import ConfigError
    from nested_reft.nested import check_skip

    n = len(find_layers(model).layers)
    if 2 * cfg.border >= n:
        raise ConfigError(f"border={cfg.border} leaves no valid layer of the model's {n}")
    if cfg.skip_layers:
        try:
            check_skip(cfg.skip_layers, n, cfg.model)
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"skip_layers: {exc}") from None


def run_layers(cfg: LayersConfig) -> dict:
    """Validate, load, profile; write layers.json and layers.png when output_dir is set."""
    import json

    from nested_reft.models import load_model_and_tokenizer

    cfg.validate()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.eval()
    check_layers(cfg, model)
    batch = calibration_batch(cfg, tokenizer)
    report = profile_model(model, batch, cfg)
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "layers.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_layers(report, out / "layers.png")
        report["files"] = [str(out / "layers.json"), str(out / "layers.png")]
    return report

"""Extra peak CPU memory of one policy pass: today's full-logits path vs the chunked `scored_head` path.

Usage: OMP_NUM_THREADS=2 python scripts/logprob_memory.py [--rows 8] [--length 256] [--prompt 16]
Prints one JSON line: each path's extra peak (MiB), their ratio, and the loss / gradient differences.

Choices:
- The model is a random Qwen2 with Qwen2.5's vocabulary (151,936) and a tiny width (hidden 64, 2 layers),
  so the [N, L, V] logits dominate the pass, as they do per row in a real model.
- One pass = forward of `rows` x (prompt + length) tokens with ``logits_to_keep = length + 1``, the
  completion log-probs, backward of their sum, as the trainer's policy pass does (temperature and EOS ban
  configurable). (a) "today": ``model(...).logits`` then ``objectives.token_logprobs``; (b) "chunked":
  the same forward under ``logprobs.scored_head``.
- Each path runs in a fresh subprocess after a 1-row warm-up pass (thread pools, kernels). Peak memory is
  the kernel's RSS high-water mark: writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS
  just before the pass, and the extra peak is VmHWM after it minus VmRSS before it (exact, no sampling; the
  parameter gradients, equal in both paths, are included). Without /proc (not Linux) it falls back to
  ``resource.getrusage`` ru_maxrss, which cannot be reset and so undercounts when an earlier peak was higher.
- The worker saves its loss and gradients; the parent compares them (max abs difference over all params).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VOCAB = 151936


def build_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=3, pad_token_id=0, bos_token_id=1)
    return Qwen2ForCausalLM(config).train()


def make_batch(rows: int, prompt: int, length: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, prompt + length), generator=gen)  # [N, P+L]
    mask = torch.ones_like(ids)
    mask[: rows // 2, : prompt // 2] = 0  # half the prompts left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions), ids[:, prompt:]


def policy_pass(model, inputs, completion, path: str, temperature: float, banned_until: int) -> torch.Tensor:
    """Sum of the completion log-probs, backpropagated; returns the (detached) sum."""
    from nested_reft.logprobs import scored_head
    from nested_reft.objectives import token_logprobs

    length = completion.shape[1]
    banned = torch.tensor([3]) if banned_until > 0 else None
    if path == "today":
        logits = model(**inputs, use_cache=False, logits_to_keep=length + 1).logits[:, :-1]  # [N, L, V]
        logp = token_logprobs(logits, completion, temperature, banned, banned_until)  # [N, L]
    else:
        with scored_head(model, completion, temperature, banned, banned_until) as scorer:
            model(**inputs, use_cache=False, logits_to_keep=length + 1)
            logp = scorer.result()  # [N, L]
    loss = logp.sum()
    loss.backward()
    return loss.detach()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn) -> tuple[float, str]:
    """(extra peak MiB of fn(), method)."""
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = rss_kib("VmRSS")
        fn()
        return (rss_kib("VmHWM") - before) / 1024, "VmHWM after clear_refs"
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss"


def worker(args) -> None:
    model = build_model()
    warm_inputs, warm_completion = make_batch(1, 4, 8, seed=2)
    policy_pass(model, warm_inputs, warm_completion, args.worker, args.temperature, args.banned_until)
    model.zero_grad(set_to_none=True)
    inputs, completion = make_batch(args.rows, args.prompt, args.length)
    result = {}
    peak, method = measure(lambda: result.setdefault(
        "loss", policy_pass(model, inputs, completion, args.worker, args.temperature, args.banned_until)))
    torch.save({"peak_mib": peak, "method": method, "loss": result["loss"],
                "grads": {n: p.grad for n, p in model.named_parameters()}}, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=256, help="completion tokens per row")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--banned-until", type=int, default=0, help="EOS banned before this position (min_new_tokens)")
    ap.add_argument("--worker", choices=("today", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("today", "chunked"):
            out = os.path.join(tmp, f"{path}.pt")
            cmd = [sys.executable, __file__, "--worker", path, "--out", out, "--rows", str(args.rows),
                   "--length", str(args.length), "--prompt", str(args.prompt), "--temperature",
                   str(args.temperature), "--banned-until", str(args.banned_until)]
            subprocess.run(cmd, check=True)
            results[path] = torch.load(out)
    today, chunked = results["today"], results["chunked"]
    grad_diff = max((today["grads"][n] - chunked["grads"][n]).abs().max().item() for n in today["grads"])
    grad_scale = max(g.abs().max().item() for g in today["grads"].values())
    logits_mib = args.rows * args.length * VOCAB * 4 / 2 ** 20
    print(json.dumps({
        "rows": args.rows, "length": args.length, "prompt": args.prompt, "vocab": VOCAB,
        "fp32_logits_mib": round(logits_mib, 1), "method": today["method"],
        "today_extra_peak_mib": round(today["peak_mib"], 1), "chunked_extra_peak_mib": round(chunked["peak_mib"], 1),
        "ratio": round(chunked["peak_mib"] / today["peak_mib"], 4),
        "today_vs_logits": round(today["peak_mib"] / logits_mib, 3),
        "loss_today": today["loss"].item(), "loss_abs_diff": (today["loss"] - chunked["loss"]).abs().item(),
        "max_abs_grad_diff": grad_diff, "max_abs_grad": grad_scale,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()

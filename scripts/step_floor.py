"""How close a `nested-reft train` run's steps come to the machine's floor: the arithmetic each phase must do,
at the rate this machine multiplies matrices of the model's shapes, against the time the phase took.

For every step after the first (warm-up) of RUN_DIR/metrics.jsonl:
- decode floor = 2 * P * generated tokens (each generated token passes every weight once; P = the model's
  parameters, the tied embedding counted once, as the LM head), at R GFLOP/s;
- update floor = 6 * P * processed tokens (prompt + completion: forward, and backward's two products);
- R = the rate of the model's own products on T = 4096 rows with the run's thread count: one layer's
  (q/k/v, o, gate, up, down) and the head, each timed, total FLOPs / total time.
The efficiency of a phase is its floor time / its measured time (median over steps). Attention, norms and
the KV cache are left out of the floor, so 1.0 is out of reach by a margin that shrinks with width.

    python scripts/step_floor.py RUN_DIR --threads 2
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml


def matmul_rate(shapes: list[tuple[int, int, int]], rows: int = 4096, repeats: int = 20) -> float:
    """GFLOP/s of the products [rows, k] @ [k, n] over `shapes` (k, n, how many of it per token) taken
    together: FLOPs / time, each product counted as often as a token meets it."""
    flops = seconds = 0.0
    for k, n, count in shapes:
        a, b = torch.randn(rows, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds += count * (time.perf_counter() - start)
        flops += count * 2.0 * rows * k * n * repeats
    return flops / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["model"])
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    c = model.config
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    n, inter = c.num_hidden_layers, c.intermediate_size
    rate = matmul_rate([(h, h, 2 * n), (h, kv, 2 * n), (h, inter, 2 * n), (inter, h, n), (h, c.vocab_size, 1)])
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    decode = [2 * params * m["tokens_generated"] / (rate * 1e9) / m["rollout_s"] for m in steps]
    update = [6 * params * m["tokens_processed"] / (rate * 1e9) / m["update_s"] for m in steps]
    print(json.dumps({
        "params": params, "gflops_per_s": rate, "steps": len(steps),
        "decode_gflop": 2 * params * statistics.median(m["tokens_generated"] for m in steps) / 1e9,
        "update_gflop": 6 * params * statistics.median(m["tokens_processed"] for m in steps) / 1e9,
        "rollout_s": statistics.median(m["rollout_s"] for m in steps),
        "update_s": statistics.median(m["update_s"] for m in steps),
        "step_s": statistics.median(m["step_s"] for m in steps),
        "decode_efficiency": statistics.median(decode), "update_efficiency": statistics.median(update),
    }, indent=2))


if __name__ == "__main__":
    main()

"""How close a `nested-reft train` run's steps come to the machine's floor: the arithmetic each phase must do,
at the rate this machine multiplies matrices of the model's shapes, against the time the phase took.

For every step after the first (warm-up) of RUN_DIR/metrics.jsonl:
- decode floor = 2 * P_active * generated tokens (each generated token passes every weight of the step's
  nested model once; P_active = the LM head and the decoder layers the step ran, less those of its skipped
  layers, from its `skip_set`; of a MoE layer's routed experts the k a token is routed to), at R GFLOP/s;
- update floor = 6 * P * processed tokens (prompt + completion: forward, and backward's two products;
  P counted as P_active with no layer skipped);
- R = the rate of the model's own products on 4096 rows with the run's thread count, in the dtype the run
  trained in (nested_reft.floor: each linear map of a layer and the head, timed, total FLOPs / total time).
The efficiency of a phase is its floor time / its measured time (median over steps). Attention, norms and
the KV cache are left out of the floor, so 1.0 is out of reach by a margin that shrinks with width.

    python scripts/step_floor.py RUN_DIR --threads 2
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from nested_reft.floor import layer_params_used, measure_machine, model_shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    from transformers import AutoModelForCausalLM

    bf16 = str(cfg.get("bf16", "auto")).lower() == "true" or (cfg.get("bf16") == "auto" and torch.cuda.is_available())
    model_path = cfg["model"]  # relative to where the run was started, which is often the run's parent
    if not Path(model_path).exists() and (run.parent / model_path).exists():
        model_path = str(run.parent / model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    shape = model_shape(model)
    params = shape.layers * layer_params_used(shape) + shape.head_params  # what one token passes through
    rate = measure_machine(model).flops_per_s / 1e9
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]

    def decode_gflop(m) -> float:  # the step's nested model: its skipped layers do no work
        return 2 * (params - len(m.get("skip_set", [])) * layer_params_used(shape)) * m["tokens_generated"] / 1e9

    decode = [decode_gflop(m) / rate / m["rollout_s"] for m in steps]
    update = [6 * params * m["tokens_processed"] / (rate * 1e9) / m["update_s"] for m in steps]
    print(json.dumps({
        "params": params, "gflops_per_s": rate, "steps": len(steps),
        "decode_gflop": statistics.median(decode_gflop(m) for m in steps),
        "update_gflop": 6 * params * statistics.median(m["tokens_processed"] for m in steps) / 1e9,
        "rollout_s": statistics.median(m["rollout_s"] for m in steps),
        "update_s": statistics.median(m["update_s"] for m in steps),
        "step_s": statistics.median(m["step_s"] for m in steps),
        "decode_efficiency": statistics.median(decode), "update_efficiency": statistics.median(update),
    }, indent=2))


if __name__ == "__main__":
    main()

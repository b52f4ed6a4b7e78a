"""Uniform against importance skip sets on one checkpoint: nested-model accuracy and KL(full || nested).

For U in --u, draws --draws skip sets with each policy (the trainer's own draw: skip_set_at with steps
0..draws-1 and --seed), profiles the model once with Block Influence on --calib training problems (their
reference solutions teacher-forced), and reports for every set its per-token KL on that batch and its
accuracy on the held-out problems (one sample per problem at the demo's eval settings). Prints a markdown
table and writes --output JSON. docs/results.md has its output for the plain toy checkpoint (2026-12-03):

    python scripts/skip_policy_study.py --model runs/plain --data-dir runs/demo/toy/data \
        --u 1 3 4 --draws 10 --output skip_policy_study.json
"""

import argparse
import json
import statistics
import time

import torch

from nested_reft.data import load_examples
from nested_reft.evaluate import EvalConfig, evaluate
from nested_reft.importance import LayersConfig, block_influence, calibration_batch, skip_kl
from nested_reft.layer_skip import skip_set_at, valid_layers
from nested_reft.models import load_model_and_tokenizer


def ratio_for(n: int, u: int) -> float:
    """A skip ratio x whose U(N, x) is u (the midpoint of u's rounding interval)."""
    return u / n


def load_profiled(model_dir: str, dataset: str, data_dir: str, calib: int):
    """The model (eval mode), its tokenizer, a calibration batch of `calib` problems with their solutions
    teacher-forced, and the model's Block Influence on it."""
    model, tok = load_model_and_tokenizer(model_dir)
    model.eval()
    batch = calibration_batch(LayersConfig(model=model_dir, dataset=dataset, data_dir=data_dir, limit=calib), tok)
    return model, tok, batch, block_influence(model, batch["input_ids"], batch["attention_mask"], batch["mask"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--u", type=int, nargs="+", default=[1, 3, 4])
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.5, help="skip temperature of the importance policy")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--border", type=int, default=1)
    ap.add_argument("--output", default="skip_policy_study.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok, batch, bi = load_profiled(args.model, args.dataset, args.data_dir, args.calib)
    n = len(model.model.layers)
    tests = {"toy": load_examples(args.dataset, "test", args.data_dir, args.eval_limit)}
    ev = EvalConfig(benchmarks=["toy"], split="test", temperature=0.6, top_p=0.95, max_new_tokens=80, batch_size=100,
                    seed=args.seed, progress=False)
    full_acc = evaluate(model, tok, tests, ev)["mean"]
    rows, cache = [], {}
    for u in args.u:
        x = ratio_for(n, u)
        for policy in ("uniform", "importance"):
            for step in range(args.draws):
                skip = skip_set_at(n, x, args.border, args.seed, step, policy, bi, args.temperature)
                if skip not in cache:
                    kl = skip_kl(model, batch["input_ids"], batch["attention_mask"], batch["mask"], [skip])[0]
                    acc = evaluate(model, tok, tests, EvalConfig(**{**ev.__dict__, "skip_layers": list(skip)}))["mean"]
                    cache[skip] = (kl, acc)
                rows.append({"u": u, "policy": policy, "step": step, "skip": list(skip), "kl": cache[skip][0],
                             "accuracy": cache[skip][1]})
            print(f"U={u} {policy}: done ({time.time() - t0:.0f} s)", flush=True)
    summary = []
    for u in args.u:
        for policy in ("uniform", "importance"):
            r = [x for x in rows if x["u"] == u and x["policy"] == policy]
            accs, kls = [x["accuracy"] for x in r], [x["kl"] for x in r]
            summary.append({"u": u, "policy": policy, "draws": len(r), "distinct_sets": len({tuple(x["skip"]) for x in r}),
                            "accuracy_mean": statistics.mean(accs), "accuracy_sd": statistics.stdev(accs) if len(r) > 1 else 0.0,
                            "kl_mean": statistics.mean(kls), "kl_sd": statistics.stdev(kls) if len(r) > 1 else 0.0})
    out = {"model": args.model, "num_layers": n, "valid_layers": valid_layers(n, args.border),
           "block_influence": bi, "temperature": args.temperature, "full_accuracy": full_acc,
           "eval_problems": len(tests["toy"]), "summary": summary, "rows": rows, "runtime_s": time.time() - t0}
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"full model: accuracy {full_acc:.3f} on {len(tests['toy'])} problems")
    print("| U | policy | draws (distinct sets) | nested accuracy mean (sd) | KL(full || nested) mean (sd) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for s in summary:
        print(f"| {s['u']} | {s['policy']} | {s['draws']} ({s['distinct_sets']}) | {s['accuracy_mean']:.3f} "
              f"({s['accuracy_sd']:.3f}) | {s['kl_mean']:.3f} ({s['kl_sd']:.3f}) |")


if __name__ == "__main__":
    main()

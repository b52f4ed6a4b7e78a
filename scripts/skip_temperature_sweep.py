"""KL(full || nested) of the importance policy's skip sets against its temperature, next to uniform draws.

For U = --u layers skipped, profiles the model once with Block Influence on --calib training problems
(reference solutions teacher-forced), draws --draws skip sets per temperature with the trainer's own
function (skip_set_at, steps 0..draws-1, --seed) and reports the mean per-token KL of those sets on the
same batch and how many distinct sets were drawn. KL only, no sampling: a minute on the toy model.

    python scripts/skip_temperature_sweep.py --model runs/plain --data-dir runs/demo/toy/data
"""

import argparse
import json
import statistics

import torch

from nested_reft.importance import skip_kl
from nested_reft.layer_skip import skip_set_at
from skip_policy_study import load_profiled  # scripts/ is on sys.path when this file runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--u", type=int, default=4)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 1.0, 0.5, 0.25, 0.1, 0.05])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _, batch, bi = load_profiled(args.model, args.dataset, args.data_dir, args.calib)
    n = len(model.model.layers)
    kl_of = {}
    rows = []
    for policy, temperature in [("uniform", None)] + [("importance", t) for t in args.temperatures]:
        sets = [skip_set_at(n, args.u / n, 1, args.seed, step, policy, bi, temperature or 1.0) for step in range(args.draws)]
        todo = [s for s in dict.fromkeys(sets) if s not in kl_of]
        kl_of.update(zip(todo, skip_kl(model, batch["input_ids"], batch["attention_mask"], batch["mask"], todo)))
        kls = [kl_of[s] for s in sets]
        rows.append({"policy": policy, "temperature": temperature, "distinct_sets": len(set(sets)),
                     "kl_mean": statistics.mean(kls), "kl_sd": statistics.stdev(kls), "kl_max": max(kls)})
    print(f"| policy | T | distinct sets of {args.draws} | KL mean (sd) | KL max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        t = "—" if r["temperature"] is None else f"{r['temperature']:g}"
        print(f"| {r['policy']} | {t} | {r['distinct_sets']} | {r['kl_mean']:.3f} ({r['kl_sd']:.3f}) | {r['kl_max']:.3f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "u": args.u, "block_influence": bi, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

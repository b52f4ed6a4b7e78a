"""Check the reward function on real reference data (not part of CI: needs ../shared/data).

For every record with a reference solution, the completion is that solution text:
- MATH500 / Math12k / Minerva / OlympiadBench: the `solution` field (MATH-style, ends in a \\boxed answer).
- GSM8K: `meta.answer`, the upstream solution text that ends in `#### <answer>` (the `solution` field stops
  before the `####` line, so it states no answer; `meta.answer` keeps the upstream thousands commas).
Self-match: the completion graded against its own `answer` (+ `meta.answer_alternatives`): should be 1.
Cross-match: the same completion graded against the answer of record (i+1) mod n, skipping pairs whose
two reference answers are the same string up to spaces: should be 0 (a 1 is a false positive).

    .venv/bin/python scripts/check_rewards_real.py --data-dir ../shared/data --datasets math500 gsm8k
"""

import argparse
import json
import time
from pathlib import Path

from nested_reft.rewards import TIMEOUT_S, extract_answer, is_equivalent


def completions(dataset: str, records: list[dict]) -> list[tuple[dict, str]]:
    if dataset == "gsm8k":
        return [(r, r["meta"]["answer"]) for r in records]
    return [(r, r["solution"]) for r in records if r["solution"]]


def graded(pred, answer: str, alternatives) -> tuple[bool, float]:
    start = time.perf_counter()
    ok = is_equivalent(pred, answer, alternatives)
    return ok, time.perf_counter() - start


def check(data_dir: Path, dataset: str, split: str, show: int) -> dict:
    records = [json.loads(line) for line in (data_dir / dataset / f"{split}.jsonl").open()]
    pairs = completions(dataset, records)
    if not pairs:
        return {"dataset": f"{dataset}/{split}", "n": 0, "note": "no reference solutions to grade"}
    self_fail, cross_fp, cross_n, times = [], [], 0, []
    for i, (record, completion) in enumerate(pairs):
        pred = extract_answer(completion)
        alternatives = record["meta"].get("answer_alternatives") or ()
        ok, seconds = graded(pred, record["answer"], alternatives)
        times.append(seconds)
        if not ok:
            self_fail.append((record["id"], pred, record["answer"], alternatives))
        other = pairs[(i + 1) % len(pairs)][0]
        if other["answer"].replace(" ", "") == record["answer"].replace(" ", ""):
            continue
        cross_n += 1
        ok, seconds = graded(pred, other["answer"], ())
        times.append(seconds)
        if ok:
            cross_fp.append((record["id"], pred, other["answer"]))
    for name, rows in (("self-match failures", self_fail), ("cross-match false positives", cross_fp)):
        for row in rows[:show]:
            print(f"  {dataset} {name}: " + " | ".join(repr(x) for x in row))
    return {
        "dataset": f"{dataset}/{split}",
        "n": len(pairs),
        "self_accuracy": 1 - len(self_fail) / len(pairs),
        "self_failures": len(self_fail),
        "cross_pairs": cross_n,
        "cross_false_positive_rate": len(cross_fp) / cross_n,
        "cross_false_positives": len(cross_fp),
        "seconds_mean": sum(times) / len(times),
        "seconds_max": max(times),
        "checks_at_time_limit": sum(t >= 0.95 * TIMEOUT_S for t in times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["math500", "gsm8k", "minerva"])
    parser.add_argument("--show", type=int, default=50, help="failures listed per dataset and kind")
    args = parser.parse_args()
    splits = {"gsm8k": "test", "math12k": "train"}
    results = [check(args.data_dir, d, splits.get(d, "test"), args.show) for d in args.datasets]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

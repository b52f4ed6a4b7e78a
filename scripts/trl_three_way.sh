#!/usr/bin/env bash
# The TRL peer job of ../shared/bench/trl_peer (28-layer width-128 Qwen2, 16 prompts x 8 completions x <= 64 tokens,
# lr 1e-5, 2 threads) three ways, alternated in one session: TRL's GRPOTrainer, NestedGRPOTrainer at x (default
# 0.15), and `nested-reft train` at x. Per-step wall time and rollout share (rollout time / step time); the first
# step of every run is left out as warm-up (unless a run has only one step: smoke runs).
# Usage: trl_three_way.sh PYTHON WORKDIR [STEPS] [ROUNDS] [X]
#   PYTHON: a python with nested-reft and its [trl] extra installed; `nested-reft` is taken from the same bin dir.
#   THREADS (env, default 2) threads per run; PEER (env) the trl_peer directory (default ../shared/bench/trl_peer).
set -euo pipefail
PY=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")  # absolute: the script changes directory
W=$2; STEPS=${3:-4}; ROUNDS=${4:-2}; X=${5:-0.15}
HERE=$(cd "$(dirname "$0")" && pwd)
PEER=${PEER:-$HERE/../../shared/bench/trl_peer}
NR=$(dirname "$PY")/nested-reft
export OMP_NUM_THREADS=${THREADS:-2} TRL_EXPERIMENTAL_SILENCE=1
mkdir -p "$W"; cd "$W"
[ -d tiny ] || "$PY" "$PEER/make_model.py" >/dev/null 2>&1
"$PY" "$HERE/peer_data.py"
for r in $(seq 1 "$ROUNDS"); do
  "$PY" "$HERE/trl_peer_steps.py" trl tiny arith.jsonl "$STEPS" 2>"trl-$r.err" | tail -1 > "trl-$r.json"
  "$PY" "$HERE/trl_peer_steps.py" nested tiny arith.jsonl "$STEPS" "$X" 2>"ntrl-$r.err" | tail -1 > "ntrl-$r.json"
  rm -rf "nr-$r"
  "$NR" train --model tiny --dataset "$W/arith.jsonl" --template plain --batch-size 16 --num-generations 8 \
    --max-new-tokens 64 --min-new-tokens 0 --lr 1e-5 --steps "$STEPS" --skip-ratio "$X" --mitigation retrace \
    --save-steps 1000 --progress false --output-dir "nr-$r" > "nr-$r.log" 2>&1
done
"$PY" - "$ROUNDS" "$X" <<'PY'
import json, statistics, sys
rounds, x = int(sys.argv[1]), sys.argv[2]
def steady(xs): return xs[1:] if len(xs) > 1 else xs  # drop the warm-up step
def med(xs): return statistics.median(xs)
out = {"x": float(x), "rounds": rounds}
for name, prefix in (("trl", "trl"), ("nested_trl", "ntrl")):
    runs = [json.load(open(f"{prefix}-{r}.json")) for r in range(1, rounds + 1)]
    step = [s for run in runs for s in steady(run["step_s"])]
    share = [g / s for run in runs for g, s in zip(steady(run["rollout_s"]), steady(run["step_s"]))]
    out[f"{name}_step_s"] = med(step)
    out[f"{name}_rollout_share"] = med(share)
    out[f"{name}_len"] = med([l for run in runs for l in run["completion_len"]])
    if prefix == "ntrl":
        out["nested_trl_h_mean"] = med([h for run in runs for h in run["h_mean"]])
rows = [json.loads(l) for r in range(1, rounds + 1) for l in steady(list(open(f"nr-{r}/metrics.jsonl")))]
out["nr_step_s"] = med([m["step_s"] for m in rows])
out["nr_rollout_share"] = med([m["rollout_s"] / m["step_s"] for m in rows])
out["nr_len"] = med([m["completion_len_mean"] for m in rows])
out["nr_h_mean"] = med([m["h_mean"] for m in rows])
out["ratio_nested_trl_over_trl"] = out["nested_trl_step_s"] / out["trl_step_s"]
out["ratio_nr_over_trl"] = out["nr_step_s"] / out["trl_step_s"]
print(json.dumps(out))
PY

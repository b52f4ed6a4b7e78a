#!/usr/bin/env bash
# `nested-reft train --compile` on the TRL peer job of ../shared/bench/trl_peer (28-layer width-128 Qwen2, 16 prompts
# x 8 completions x <= 64 tokens, lr 1e-5, 2 threads), alternated in one session with TRL's GRPOTrainer and with
# the eager trainer, at x = 0 and x = 0.15. Median step time over every step but the first (warm-up, which holds
# the compilation), the first step's time, the update time, and the ratios to TRL.
# Usage: compile_peer.sh TRL_PYTHON NESTED_REFT_BIN WORKDIR [STEPS] [ROUNDS]   (as side_by_side.sh; STEPS >= 2)
set -euo pipefail
abs() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }  # the script changes directory
TRLPY=$(abs "$1"); NR=$(abs "$2"); W=$3; STEPS=${4:-4}; ROUNDS=${5:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
PEER=${PEER:-$HERE/../../shared/bench/trl_peer}
export OMP_NUM_THREADS=2
mkdir -p "$W"; cd "$W"
[ -d tiny ] || "$TRLPY" "$PEER/make_model.py" >/dev/null
"$TRLPY" "$HERE/peer_data.py"
for r in $(seq 1 "$ROUNDS"); do
  "$TRLPY" "$PEER/trl_steps.py" tiny arith.jsonl "$STEPS" 2>/dev/null | tail -1 > "trl-$r.json"
  for run in "0 false" "0 true" "0.15 false" "0.15 true"; do
    set -- $run
    rm -rf "nr-$1-$2-$r"
    "$NR" train --model tiny --dataset "$W/arith.jsonl" --template plain --batch-size 16 --num-generations 8 \
      --max-new-tokens 64 --min-new-tokens 0 --lr 1e-5 --steps "$STEPS" --skip-ratio "$1" --compile "$2" \
      --save-steps 1000 --progress false --output-dir "nr-$1-$2-$r" > "nr-$1-$2-$r.log" 2>&1
  done
done
"$TRLPY" - "$ROUNDS" <<'PY'
import json, statistics, sys
rounds = int(sys.argv[1])
med = statistics.median
trl = med([s for r in range(1, rounds + 1) for s in json.load(open(f"trl-{r}.json"))["step_s"][1:]])
out = {"trl_step_s": round(trl, 3)}
for x in ("0", "0.15"):
    for c in ("false", "true"):
        rows = [[json.loads(l) for l in open(f"nr-{x}-{c}-{r}/metrics.jsonl")] for r in range(1, rounds + 1)]
        key = f"x{x}_compile_{c}"
        out[key] = {"step_s": round(med([m["step_s"] for rs in rows for m in rs[1:]]), 3),
                    "update_s": round(med([m["update_s"] for rs in rows for m in rs[1:]]), 3),
                    "first_step_s": round(med([rs[0]["step_s"] for rs in rows]), 3)}
        out[key]["over_trl"] = round(out[key]["step_s"] / trl, 3)
print(json.dumps(out))
PY

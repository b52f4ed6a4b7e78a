"""The TRL peer job's prompts (as ../shared/bench/trl_peer/side_by_side.sh writes them): 256 two-digit additions,
seed 0, written to arith.jsonl in the current directory. Used by trl_three_way.sh and compile_peer.sh."""

import json
import random

random.seed(0)
with open("arith.jsonl", "w") as f:
    for i in range(256):
        a, b = random.randint(10, 99), random.randint(10, 99)
        f.write(json.dumps({"id": str(i), "problem": f"what is {a} + {b} ?", "answer": str(a + b), "solution": None,
                            "meta": {}}) + "\n")

"""One process of a distributed test: `torchrun ... tests/dist_worker.py train --model ...` runs the real
`nested-reft` CLI, with two test hooks set by environment variables:

- NESTED_REFT_TEST_REWARDS=alternating: rewards 1,0,1,0,... (an untrained model scores 0 everywhere, so
  every advantage would be 0 and the update a no-op).
- NESTED_REFT_TEST_FAIL="RANK:STEP:MODE": process RANK, at the start of RL step STEP (0-based), either
  exits at once without cleanup (MODE=exit, like a crash or an OOM kill) or stops answering (MODE=hang,
  like a wedged GPU or a lost node: its sockets stay open).
"""

import os
import sys
import time

from nested_reft import cli, trainer

if os.environ.get("NESTED_REFT_TEST_REWARDS") == "alternating":
    trainer.math_reward = lambda texts, answers, alts: [float(i % 2 == 0) for i in range(len(texts))]

if os.environ.get("NESTED_REFT_TEST_FAIL"):
    rank, at_step, mode = os.environ["NESTED_REFT_TEST_FAIL"].split(":")
    real_step = trainer.rl_step

    def failing_step(run, step):
        if run.accelerator.process_index == int(rank) and step == int(at_step):
            print(f"test hook: rank {rank} fails ({mode}) at step {step}", file=sys.stderr, flush=True)
            if mode == "exit":
                os._exit(17)
            while True:
                time.sleep(60)
        return real_step(run, step)

    trainer.rl_step = failing_step

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))

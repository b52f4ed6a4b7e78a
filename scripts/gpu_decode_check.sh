#!/usr/bin/env bash
# The device check of issue 14, prepared for a lent GPU (about 7 minutes on one H100): the CUDA-graph tests
# that CPU machines skip, then bf16 decoding at the qwen2.5-1.5b shape (random weights, 16 prompts x 8
# completions x 256 tokens): the engine with CUDA graphs, the same engine eager, HF generate(), and the
# floor (weight and KV-cache reads at the measured bandwidth), side by side in one run; then the trainer's
# mixed precision (bf16 autocast over float32 weights) decoding with each weight cast once per call against
# at every token (scripts/autocast_decode_cost.py); then CUDA graphs against the eager loop on rollouts that
# end at EOS, where each compaction captures again (scripts/graphs_cost.py).
#
#   bash scripts/gpu_decode_check.sh OUT_DIR        # on the GPU machine, from the repository root
#
# It uses the machine's own torch and transformers (the project on PYTHONPATH, nothing installed); their
# versions are written first, with the device's name.
set -uo pipefail
out=${1:-/tmp/gpu-decode-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())" | tee "$out/versions.txt"
$py -m pytest -q -p no:cacheprovider tests/test_decode_graphs.py tests/test_kv_cache.py 2>&1 | tee "$out/tests.log"
$py -m nested_reft bench --preset qwen2.5-1.5b --batch-size 16 --num-generations 8 --prompt-len 64 \
  --max-new-tokens 256 --skip-ratio 0.15 --repeats 3 --compare-generate --floor --cuda-graphs --json \
  > "$out/bench.json" 2> >(tee "$out/bench.err" >&2)
$py -c "import json, sys; from nested_reft.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" \
  "$out/bench.json" | tee "$out/bench.txt"
$py scripts/autocast_decode_cost.py --preset qwen2.5-1.5b --rows 16 --generations 8 --prompt-len 64 --tokens 256 \
  --rounds 3 --device cuda 2>&1 | tee "$out/autocast.txt"
$py scripts/graphs_cost.py --preset qwen2.5-1.5b --rows 16 --generations 8 --prompt-len 64 --tokens 256 \
  --eos-fraction 0.01 --rounds 3 2>&1 | tee "$out/graphs_eos.txt"

#!/usr/bin/env bash
# One 1-GPU device call (issue 14): decode latency per token, dense vs Memory+ vs MoE, at the
# 1.3B and 8B widths, batch 1..256 (benchmarks/bench_decode.py), each base in its own process;
# then one PNG of both. No megatron-core needed; tokenizers from .whl if the image lacks it.
# Extra arguments go to bench_decode.py (e.g. --batches 1 8 64).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ! python3 -c "import tokenizers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/tokenizers-*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
out=${OUT:-build/decode}
for base in 1.3b 8b; do
  timeout 270 python3 benchmarks/bench_decode.py --bases "$base" --profile --csv "$out/decode_$base.csv" "$@" \
    || echo "bench_decode.py --bases $base: exit status $?"
done
csvs=$(ls "$out"/decode_1.3b.csv "$out"/decode_8b.csv 2>/dev/null)
[ -n "$csvs" ] && python3 benchmarks/bench_decode.py --plot $csvs --png "$out/decode.png"

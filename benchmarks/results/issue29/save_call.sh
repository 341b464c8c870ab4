#!/usr/bin/env bash
# Copy what one device call of issue 29 returned (files_at folder) into this folder:
#   bash benchmarks/results/issue29/save_call.sh FILES_AT CALL_NAME
# keeps call.log, longrun_phaseN.md, and from longrun_phaseN.tgz the logs, recall.json and each
# model's TensorBoard scalars as JSON (scalars_<model>.json); the event files themselves too.
set -euo pipefail
SRC=$1; NAME=$2
HERE=$(cd "$(dirname "$0")" && pwd); DEST=$HERE/$NAME
ROOT=$(cd "$HERE/../../.." && pwd)
mkdir -p "$DEST"
cp "$SRC"/*.log "$SRC"/*.md "$DEST/" 2>/dev/null || true
for t in "$SRC"/longrun_phase*.tgz; do
  [ -e "$t" ] || continue
  tar -C "$DEST" -xzf "$t"
done
PY=${PYTHON:-/work/main/.venv/bin/python}
PYTHONPATH=$ROOT "$PY" - "$DEST" <<'PYEOF' 2>/dev/null
import json, sys
from pathlib import Path
from megatron_memory.tools.plot_run import read_scalars
dest = Path(sys.argv[1])
for tb in sorted((dest / "tb").glob("*")):
    sc = read_scalars(tb)
    (dest / f"scalars_{tb.name}.json").write_text(json.dumps(sc) + "\n")
    print("wrote", dest / f"scalars_{tb.name}.json")
PYEOF
ls -la "$DEST"

#!/usr/bin/env bash
# Copy what one device call of a long run returned (the files_at folder) into DEST (e.g.
# benchmarks/results/issue29/call1):
#   bash benchmarks/device/save_call.sh FILES_AT DEST
# keeps call.log, longrun_phaseN.md, and from longrun_phaseN.tgz the logs, recall.json and each
# model's TensorBoard scalars as JSON (scalars_<model>.json); the event files themselves too.
set -euo pipefail
SRC=$1; DEST=$2
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$DEST"
cp "$SRC"/*.log "$SRC"/*.md "$DEST/" 2>/dev/null || true
for t in "$SRC"/longrun_phase*.tgz; do
  [ -e "$t" ] || continue
  tar -C "$DEST" -xzf "$t"
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
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

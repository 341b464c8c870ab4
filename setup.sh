#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install megatron-memory with its pinned dependencies.
# Idempotent: a second run only checks that the install matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
    local c v
    for c in "${PYTHON:-}" python3.14 python3.13 python3.12 python3 \
             "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9]; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
        v=$("$c" -c 'import sys; print(int(sys.version_info >= (3, 12)))' 2>/dev/null) || continue
        if [ "$v" = 1 ]; then echo "$c"; return 0; fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    if ! PY=$(find_python); then
        echo "error: megatron-memory needs Python >= 3.12 (megatron-core 0.19 requires it) and none" >&2
        echo "       was found. Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
    echo "setup: creating .venv with $("$PY" --version) ($PY)"
    "$PY" -m venv .venv
fi

stamp=.venv/.megatron-memory-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pinned dependencies (torch, megatron-core, deepspeed, ...) into .venv"
    log=.venv/setup.log
    # DS_BUILD_OPS=0: deepspeed serves as a launcher here; no CUDA ops are compiled at install.
    if ! { .venv/bin/python -m pip install -q --upgrade pip \
           && DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[test,launch]" \
           && .venv/bin/python -W ignore -c "import torch, megatron.core, deepspeed, tokenizers, tensorboard"
         } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "error: installing into .venv failed; full log: $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"

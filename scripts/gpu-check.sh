#!/usr/bin/env bash
# The first thing to run on a GPU: the kernel tests compiled for it (no interpreter), then the
# attention and loss benchmarks; their tables go to stdout and to RESULTS_DIR/gpu-check.md.
#
#   scripts/gpu-check.sh [RESULTS_DIR]      # default: $OUT if set (the device tool), else gpu-check/
#
# Needs torch with CUDA, triton, transformers, pytest, pydantic and pyyaml (qtulu's config, which the
# benchmarks' memory helper imports); bitsandbytes, peft and trl are not needed. qtulu need not be
# installed: without it the checkout is put on the path through a folder of links (qtulu.kernels and
# qtulu.benchmarks are the top-level kernels/ and benchmarks/). Exits non-zero if a test failed; the
# benchmarks run either way. About 5-8 minutes on an H100/H200 (first-time autotuning included).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
REPORT="$RESULTS_DIR/gpu-check.md"
PYTHON=$(command -v "${PYTHON:-python3}")
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, never the interpreter

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: torch sees no CUDA device; run this on a GPU machine" >&2
    exit 2
fi
missing=$("$PYTHON" -c "
import importlib.util
print(' '.join(m for m in ('triton', 'transformers', 'pytest', 'pydantic', 'yaml') if not importlib.util.find_spec(m)))")
if [ -n "$missing" ]; then
    echo "gpu-check: missing Python packages: $missing (install them, or carry their wheels)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import qtulu.kernels, qtulu.benchmarks" 2>/dev/null; then
    links=$(mktemp -d)
    mkdir "$links/qtulu"
    for entry in qtulu/*; do ln -s "$PWD/$entry" "$links/qtulu/"; done
    for top in kernels benchmarks configs; do ln -s "$PWD/$top" "$links/qtulu/$top"; done
    export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    echo "# qtulu GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    "$PYTHON" -c "import torch, triton; print(f'{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}')"
    echo
} | tee "$REPORT"

echo "## Kernel tests, compiled (no interpreter)" | tee -a "$REPORT"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_attention_plugin.py 2>&1 \
    | tee "$RESULTS_DIR/tests.log" | tail -n 40
tests_status=${PIPESTATUS[0]}
{ echo; echo '```'; grep -E "passed|failed|error" "$RESULTS_DIR/tests.log" | tail -n 30; echo '```'; echo; } >> "$REPORT"

bench() {  # bench TITLE MODULE ARGS...: run one benchmark, its table into the report
    local title=$1 module=$2
    shift 2
    echo "## $title" | tee -a "$REPORT"
    # from / : the checkout's top-level kernels/ must not shadow the PyPI name `kernels` that
    # transformers probes (python -m puts the current folder on the path)
    (cd / && "$PYTHON" -m "qtulu.benchmarks.$module" "$@") 2>&1 | tee -a "$REPORT"
    echo | tee -a "$REPORT"
}
bench "Attention: 16k-token TÜLU-like row, bf16, 32 heads x 128" attention
bench "Attention: the same with 8 kv heads (GQA)" attention --kv-heads 8
bench "Attention: 2k-token row, 32 heads / 8 kv heads (few programs: dk/dv split)" attention --tokens 2048 --kv-heads 8
bench "Loss: 8192 tokens x 32000 vocab x 4096 hidden, bf16, frozen lm_head" loss
bench "Loss: the same with a trained lm_head" loss --weight-grad

echo "gpu-check: report in $REPORT (tests: exit $tests_status)"
exit "$tests_status"

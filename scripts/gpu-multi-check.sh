#!/usr/bin/env bash
# On a machine with 2+ GPUs: qtulu train in 1 process vs 2 DDP processes (torchrun and accelerate
# launch with configs/launch/ddp.yaml), and the FSDP-QLoRA launch, on the same global batch; checks
# that the per-step losses and the adapters agree and prints each process's peak GPU memory.
#
#   scripts/gpu-multi-check.sh [RESULTS_DIR]     # default: $OUT if set (the device tool), else gpu-multi-check/
#   SIZE=135m STEPS=20 scripts/gpu-multi-check.sh
#
# Needs qtulu installed (the `qtulu`, `torchrun` and `accelerate` commands) with CUDA torch and
# bitsandbytes. SIZE (default micro: a random-init model, nothing to download), MIX (sample), STEPS (8),
# LOSS_RTOL (1e-4) and ADAPTER_RTOL (1e-3: cuBLAS sums in another order for other batch shapes).
# FSDP-QLoRA (bf16 storage of the 4-bit weights) is compared like DDP. Exits non-zero when a comparison fails.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-${OUT:-gpu-multi-check}}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
SIZE=${SIZE:-micro}
MIX=${MIX:-sample}
STEPS=${STEPS:-8}
export LOSS_RTOL=${LOSS_RTOL:-1e-4} ADAPTER_RTOL=${ADAPTER_RTOL:-1e-3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, never the interpreter

QTULU=$(command -v qtulu) || { echo "gpu-multi-check: qtulu is not installed (pip install -e .)" >&2; exit 2; }
BIN=$(dirname "$QTULU")
PYTHON="$BIN/python"
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "${gpus:-0}" -lt 2 ]; then
    echo "gpu-multi-check: needs 2 GPUs, torch sees ${gpus:-0}" >&2
    exit 2
fi

train_args=(train --size "$SIZE" --mix "$MIX" --max-steps "$STEPS" --data.cache_dir "$RESULTS_DIR/data")
runs=()
run() {  # run NAME COMMAND...: train into RESULTS_DIR/NAME, log to NAME.log
    local name=$1
    shift
    rm -rf "${RESULTS_DIR:?}/$name"
    echo "== $name: $* ${train_args[*]} --output $RESULTS_DIR/$name"
    "$@" "${train_args[@]}" --output "$RESULTS_DIR/$name" >"$RESULTS_DIR/$name.log" 2>&1
    local status=$?
    echo "   exit $status ($(tail -n 1 "$RESULTS_DIR/$name.log"))"
    [ "$status" -eq 0 ] && runs+=("$name")
    return "$status"
}

failed=0
CUDA_VISIBLE_DEVICES=0 run one "$QTULU" || failed=1
CUDA_VISIBLE_DEVICES=0,1 run ddp-torchrun "$BIN/torchrun" --nproc_per_node 2 "$QTULU" || failed=1
CUDA_VISIBLE_DEVICES=0,1 run ddp-accelerate "$BIN/accelerate" launch --config_file configs/launch/ddp.yaml \
    --num_processes 2 "$QTULU" || failed=1
# fp32 storage: the same compute dtype as the one-process run (micro: fp32), so the numbers compare
fsdp_flags=(--launch.strategy fsdp --quant.quant_storage fp32)
CUDA_VISIBLE_DEVICES=0,1 run fsdp-qlora "$BIN/accelerate" launch --config_file configs/launch/fsdp_qlora.yaml \
    --num_processes 2 "$QTULU" "${fsdp_flags[@]}" || failed=1

"$PYTHON" - "$RESULTS_DIR" "${runs[@]}" <<'EOF' || failed=1
import json
import os
import sys
from pathlib import Path

from safetensors.torch import load_file

root, names = Path(sys.argv[1]), sys.argv[2:]
loss_rtol, adapter_rtol = float(os.environ["LOSS_RTOL"]), float(os.environ["ADAPTER_RTOL"])
rows = {n: [json.loads(x) for x in (root / n / "metrics.jsonl").read_text().splitlines() if x.strip()] for n in names}
print("\npeak GPU memory per process (MiB, the run's maximum):")
for name, steps in rows.items():
    per_rank = [max(s.get("peak_memory_bytes_per_rank", [s["peak_memory_bytes"]])[r] for s in steps)
                for r in range(len(steps[-1].get("peak_memory_bytes_per_rank", [0])))]
    print(f"  {name:16s} " + "  ".join(f"rank {r}: {b / 2**20:9.1f}" for r, b in enumerate(per_rank)))
if "one" not in rows:
    sys.exit("no 1-process reference run to compare with")
ok = True
ref = rows["one"]
ref_adapter = load_file(root / "one" / "adapter" / "adapter_model.safetensors")
for name in names:
    if name == "one":
        continue
    steps = rows[name]
    if len(steps) != len(ref):
        ok = False
        print(f"{name}: DIFFERS: {len(steps)} steps, the 1-process run {len(ref)}")
        continue
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(steps, ref, strict=True))
    same_tokens = [s["trainable_tokens"] for s in steps] == [s["trainable_tokens"] for s in ref]
    adapter = load_file(root / name / "adapter" / "adapter_model.safetensors")
    drift = max(float((adapter[k].float() - ref_adapter[k].float()).norm() / ref_adapter[k].float().norm().clamp(min=1e-12))
                for k in ref_adapter)
    good = worst <= loss_rtol and drift <= adapter_rtol and same_tokens
    ok &= good
    print(f"{name}: {'OK' if good else 'DIFFERS'}: worst relative loss difference {worst:.2e} (<= {loss_rtol:g}), "
          f"adapter {drift:.2e} (<= {adapter_rtol:g}), same trainable tokens per step: {same_tokens}")
sys.exit(0 if ok else 1)
EOF
echo "gpu-multi-check: $([ "$failed" -eq 0 ] && echo passed || echo FAILED); logs and runs in $RESULTS_DIR"
exit "$failed"

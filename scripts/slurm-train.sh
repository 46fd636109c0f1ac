#!/bin/bash
# qtulu train on 2 machines x 8 GPUs under SLURM (DDP): one `accelerate launch` per machine, each
# starting 8 processes; the job's first host is the rendezvous.
#
#   sbatch scripts/slurm-train.sh --size 65b --mix human+gpt --output /shared/runs/tulu-65b
#   sbatch --nodes 4 scripts/slurm-train.sh ...          # more machines: nothing else changes
#   GPUS_PER_NODE=4 sbatch --gpus-per-node 4 scripts/slurm-train.sh ...
#
# Every machine must see the same run folder (--output) and data cache (default: beside the run
# folder), on a shared filesystem: the main process prepares the data and writes checkpoints, and
# each process writes its own RNG state into the checkpoint being saved. Resume with the same job
# (same number of machines and GPUs) and --resume; another number of processes is refused.
#
# Time limit: SLURM sends SIGTERM 5 minutes before it (--signal below) to each machine's launcher,
# which passes it to its processes; they agree to stop after the same step, save one checkpoint and
# exit. The launcher waits 30 s for them before killing them (TORCHELASTIC_SHUTDOWN_TIMEOUT raises
# it), so a step plus a checkpoint save must fit in that.
#
#SBATCH --job-name=qtulu-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: sbatch scripts/slurm-train.sh --size SIZE --mix MIX --output SHARED_DIR [qtulu train flags]" >&2
    exit 2
fi

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MAIN_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MAIN_PORT="${MAIN_PORT:-29500}"
QTULU="$(command -v qtulu)"
export GPUS_PER_NODE MAIN_HOST MAIN_PORT QTULU
# the shipped DDP config, from the submit directory (sbatch runs this script from a spool copy)
export LAUNCH_CONFIG="${LAUNCH_CONFIG:-$SLURM_SUBMIT_DIR/configs/launch/ddp.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

echo "qtulu: $SLURM_NNODES machines x $GPUS_PER_NODE GPUs, rendezvous $MAIN_HOST:$MAIN_PORT, $QTULU train $*"

# One task per machine; SLURM_NODEID (0, 1, ...) is the machine rank, read on each machine (single
# quotes). --kill-on-bad-exit: when one machine's launcher fails, the other's is stopped too rather
# than waiting on a rendezvous that will never complete.
# (srun no longer inherits --cpus-per-task from sbatch, hence passed again.)
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 bash -c '
    exec accelerate launch --config_file "$LAUNCH_CONFIG" --multi_gpu \
        --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
        --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT" \
        "$QTULU" train "$@"
' qtulu-launch "$@"

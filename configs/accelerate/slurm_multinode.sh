#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch configs/accelerate/slurm_multinode.sh train-diffusion --config configs/diffusion_sd_256.yaml \
#       --output-dir /shared/runs/diffusion
#
# The arguments are an `ldm` command. Run it from the repository root, with outputs and train.cache_dir on a
# filesystem every node sees. If OUTPUT_DIR/checkpoints holds a checkpoint, the run resumes from the latest
# (so the same line restarts a preempted job). Adapt the #SBATCH lines to your cluster (partition, account).
#SBATCH --job-name=ldm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: sbatch $0 train-autoencoder|train-diffusion --config FILE --output-dir DIR [--set KEY=VALUE ...]" >&2
    exit 2
fi

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# Node 0 of the allocation hosts the rendezvous; every node reaches it at this address.
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# --output-dir's value, to resume only when there is something to resume from (--resume latest fails otherwise).
OUTPUT_DIR=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "--output-dir" ]; then OUTPUT_DIR=$arg; fi
    previous=$arg
done
RESUME=""
if [ -n "$OUTPUT_DIR" ] && compgen -G "$OUTPUT_DIR/checkpoints/step_*/trainer_state.json" > /dev/null; then
    RESUME="--resume latest"
fi

export ACCELERATE_CONFIG GPUS_PER_NODE MAIN_PROCESS_IP MAIN_PROCESS_PORT NUM_PROCESSES RESUME
echo "ldm on $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs = $NUM_PROCESSES processes; main $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"

# Single quotes: SLURM_NODEID is read on each node, where srun starts this command (it is that node's rank).
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m ldm "$@" $RESUME' ldm "$@"

#!/usr/bin/env bash
# SLURM example: N nodes × G GPUs, one torchrun per node. Submit with
#   sbatch --nodes=2 --gres=gpu:8 --ntasks-per-node=1 launch/slurm.sh --config configs/cifar10_resnet20.yaml ensemble.size=4
# The world size (nodes × GPUs) must be <= ensemble.size or a multiple of it; --run-dir on shared storage.
# MASTER_PORT (default 29500) must be free on the first node. The same launch with `accelerate launch`
# (configs/accelerate/2nodes_8gpu.yaml) is what tests/test_two_nodes.py runs, two "nodes" on one machine.
#SBATCH --job-name=dvtrain
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    launch/train.py "$@"

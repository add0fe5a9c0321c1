#!/bin/bash
# Tokenize the training config's data across a Slurm cluster:
#   launch/prepare_slurm.sh NUM_TASKS [Hydra overrides...]
#   e.g. SBATCH_ARGS="--partition=cpu --cpus-per-task=32" launch/prepare_slurm.sh 64 data=llama_mixture data.num_proc=32
# Submits three jobs, each waiting for the one before (afterok): the tokenizer stage (one task), NUM_TASKS tokenize
# tasks as one array job (they run wherever Slurm puts them; each writes only its own shards), and the index stage
# (checks every shard and writes index.json). Prints the three job ids. A failed array task can be resubmitted
# alone (sbatch --array=<i> launch/prepare.sbatch --stage tokenize ...); finished shards are never redone.
# SBATCH_ARGS: extra sbatch options for all three (partition, account, --output, CPUs per task, time).
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NUM_TASKS [Hydra overrides...]  (NUM_TASKS: a positive count of tokenize tasks)" >&2
    exit 2
fi
tasks=$1
shift
script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/prepare.sbatch"
read -r -a extra <<< "${SBATCH_ARGS:-}"
tok=$(sbatch --parsable "${extra[@]}" "$script" --stage tokenizer "$@")
arr=$(sbatch --parsable "${extra[@]}" --dependency="afterok:${tok%%;*}" --array="0-$((tasks - 1))" "$script" \
    --stage tokenize --num-tasks "$tasks" "$@")
idx=$(sbatch --parsable "${extra[@]}" --dependency="afterok:${arr%%;*}" "$script" --stage index "$@")
echo "${tok%%;*} ${arr%%;*} ${idx%%;*}"

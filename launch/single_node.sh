#!/usr/bin/env bash
# One node, N processes: DeepSpeed's own launcher starts N ranks of coconut_scale.train on this machine.
# Run from the repository root (recipes use paths relative to it).
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: [MASTER_PORT=29500] [DRY_RUN=1] launch/single_node.sh NUM_GPUS RECIPE [section.key=value ...]

  NUM_GPUS     processes to start on this node (one per GPU; on a CPU-only machine, CPU ranks over gloo)
  RECIPE       recipe YAML, e.g. recipes/gpt2_prosqa.yaml
  overrides    passed to coconut_scale.train unchanged, e.g. optim.lr=5e-5 output_dir=runs/try2
  MASTER_PORT  rendezvous port (deepspeed's default 29500 when unset); set it to run two jobs on one node
  DRY_RUN=1    print the command instead of running it
USAGE
}

die() { echo "single_node.sh: $*" >&2; exit 2; }

if [[ $# -lt 1 ]]; then usage; die "missing NUM_GPUS"; fi
if [[ $# -lt 2 ]]; then usage; die "missing RECIPE"; fi
num_gpus=$1
recipe=$2
shift 2
[[ $num_gpus =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$num_gpus'"
[[ -f $recipe ]] || die "RECIPE '$recipe' is not a file (run from the repository root, or give its path)"

cmd=(deepspeed --num_gpus "$num_gpus")
if [[ -n ${MASTER_PORT:-} ]]; then
  [[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
  cmd+=(--master_port "$MASTER_PORT")
fi
cmd+=(--module coconut_scale.train "$recipe" "$@")

# deepspeed drops CUDA_VISIBLE_DEVICES when --num_gpus is given and uses devices 0..N-1 of the node.
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  echo "single_node.sh: warning: deepspeed ignores CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES with --num_gpus" \
       "and uses devices 0..$((num_gpus - 1)); to pick devices run" \
       "deepspeed --include localhost:$CUDA_VISIBLE_DEVICES --module coconut_scale.train ..." >&2
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# SIGUSR1 asks the ranks to save and stop at their next optimizer step (checkpoint.on_signal). A scheduler sends it
# to every process of the job (SLURM's --signal), these launchers too, which it would kill on the spot (its default
# action): they ignore it, passed on through exec; each rank installs its own handler.
trap '' USR1
exec "${cmd[@]}"

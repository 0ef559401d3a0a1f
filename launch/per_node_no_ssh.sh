#!/usr/bin/env bash
# Multi-node without ssh: run this once on every node (same HOSTFILE, same RECIPE, same MASTER_ADDR/PORT),
# each with its own NODE_RANK. DeepSpeed then starts only this node's ranks (`deepspeed --no_ssh
# --node_rank K`); rank numbers come from the order of HOSTFILE, whose host names are labels only.
# Nothing is copied between nodes: each node's own environment (WANDB_*, HF_*, NCCL_*) is what its ranks see,
# and .deepspeed_env is not read on this path.
# Run from the repository root, which every node must see at the same path (checkpoints need a shared
# filesystem too).
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: NODE_RANK=K MASTER_ADDR=HOST [MASTER_PORT=29500] [GPUS_PER_NODE=N] [DRY_RUN=1] \
         launch/per_node_no_ssh.sh HOSTFILE RECIPE [section.key=value ...]

  HOSTFILE       one line per node, `name slots=GPUS`, identical on every node (see launch/hostfile.example)
  RECIPE         recipe YAML, e.g. recipes/llama8b_gsm.yaml
  overrides      passed to coconut_scale.train unchanged
  NODE_RANK      this node's 0-based line in HOSTFILE; node 0 hosts the rendezvous
  MASTER_ADDR    address of node 0 that every node can reach
  MASTER_PORT    rendezvous port on node 0 (default 29500)
  GPUS_PER_NODE  processes per node (default: each host's slots in HOSTFILE)
  DRY_RUN=1      print the command instead of running it
USAGE
}

die() { echo "per_node_no_ssh.sh: $*" >&2; exit 2; }

if [[ $# -lt 1 ]]; then usage; die "missing HOSTFILE"; fi
if [[ $# -lt 2 ]]; then usage; die "missing RECIPE"; fi
hostfile=$1
recipe=$2
shift 2
if [[ -z ${NODE_RANK:-} ]]; then usage; die "missing NODE_RANK (this node's 0-based line in HOSTFILE)"; fi
if [[ -z ${MASTER_ADDR:-} ]]; then usage; die "missing MASTER_ADDR (address of node 0)"; fi
master_port=${MASTER_PORT:-29500}

[[ -f $hostfile ]] || die "HOSTFILE '$hostfile' is not a file"
[[ -f $recipe ]] || die "RECIPE '$recipe' is not a file (run from the repository root, or give its path)"
# Same rule as DeepSpeed's hostfile parser: blank lines and lines starting with # are skipped.
num_nodes=$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile" || true)
[[ $num_nodes -gt 0 ]] || die "HOSTFILE '$hostfile' lists no hosts"
if ! [[ $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] || ((NODE_RANK >= num_nodes)); then
  die "NODE_RANK must be 0..$((num_nodes - 1)) for the $num_nodes hosts in '$hostfile', got '$NODE_RANK'"
fi
[[ $master_port =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$master_port'"

cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK"
     --master_addr "$MASTER_ADDR" --master_port "$master_port")
if [[ -n ${GPUS_PER_NODE:-} ]]; then
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
  cmd+=(--num_gpus "$GPUS_PER_NODE")
fi
cmd+=(--module coconut_scale.train "$recipe" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# SIGUSR1 asks the ranks to save and stop at their next optimizer step (checkpoint.on_signal). A scheduler sends it
# to every process of the job (SLURM's --signal), these launchers too, which it would kill on the spot (its default
# action): they ignore it, passed on through exec; each rank installs its own handler.
trap '' USR1
exec "${cmd[@]}"

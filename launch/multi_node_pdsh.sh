#!/usr/bin/env bash
# Multi-node from one node: DeepSpeed reads HOSTFILE and starts every node's ranks over pdsh (ssh).
# Needs: pdsh on this node, passwordless ssh from here to every host, and the repository and Python
# environment at the same paths on every node (the remote command is `cd <this directory>; <this python>
# -m deepspeed.launcher.launch ...`). Run from the repository root.
# Only NCCL*/PYTHON*/UCX*/MLFLOW*/MV2* variables and the lines of .deepspeed_env reach the other nodes; write
# that file with launch/write_deepspeed_env.sh to carry WANDB_* and HF_*.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: [MASTER_ADDR=HOST] [MASTER_PORT=29500] [GPUS_PER_NODE=N] [DRY_RUN=1] \
         launch/multi_node_pdsh.sh HOSTFILE RECIPE [section.key=value ...]

  HOSTFILE       one line per node, `name slots=GPUS`, names reachable by ssh (see launch/hostfile.example)
  RECIPE         recipe YAML, e.g. recipes/llama8b_gsm.yaml
  overrides      passed to coconut_scale.train unchanged
  MASTER_ADDR    address of the first host (default: deepspeed asks it over ssh with `hostname -I`)
  MASTER_PORT    rendezvous port (default 29500)
  GPUS_PER_NODE  processes per node (default: each host's slots in HOSTFILE)
  DRY_RUN=1      print the command instead of running it
USAGE
}

die() { echo "multi_node_pdsh.sh: $*" >&2; exit 2; }

if [[ $# -lt 1 ]]; then usage; die "missing HOSTFILE"; fi
if [[ $# -lt 2 ]]; then usage; die "missing RECIPE"; fi
hostfile=$1
recipe=$2
shift 2
[[ -f $hostfile ]] || die "HOSTFILE '$hostfile' is not a file"
[[ -f $recipe ]] || die "RECIPE '$recipe' is not a file (run from the repository root, or give its path)"

# DeepSpeed reads ~/NAME and ./NAME (NAME = $DS_ENV_FILE or .deepspeed_env; an absolute DS_ENV_FILE is used
# as is) and splits every line at its first '='. A line without '=' (blank, comment) crashes the launcher,
# and a comment that contains '=' is worse: it becomes `export # ...=...;` and comments out the remote
# command. Check both files here, where the error can name the line.
env_name=${DS_ENV_FILE:-.deepspeed_env}
if [[ $env_name == /* ]]; then env_files=("$env_name"); else env_files=("$HOME/$env_name" "./$env_name"); fi
found_env_file=0
for env_file in "${env_files[@]}"; do
  [[ -f $env_file ]] || continue
  found_env_file=1
  line_no=0
  while IFS= read -r line || [[ -n $line ]]; do
    line_no=$((line_no + 1))
    [[ $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] \
      || die "$env_file line $line_no is not NAME=value (DeepSpeed cannot parse it): '$line'"
  done < "$env_file"
done
if [[ $found_env_file == 0 ]] && compgen -e | grep -qE '^(WANDB|HF)_'; then
  echo "multi_node_pdsh.sh: warning: no $env_name in $HOME or $PWD: WANDB_*/HF_* variables set here will" \
       "not reach the other nodes (write it with launch/write_deepspeed_env.sh)" >&2
fi

cmd=(deepspeed --hostfile "$hostfile" --launcher pdsh)
if [[ -n ${MASTER_ADDR:-} ]]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n ${MASTER_PORT:-} ]]; then
  [[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
  cmd+=(--master_port "$MASTER_PORT")
fi
if [[ -n ${GPUS_PER_NODE:-} ]]; then
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
  cmd+=(--num_gpus "$GPUS_PER_NODE")
fi
cmd+=(--module coconut_scale.train "$recipe" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
command -v pdsh >/dev/null || die "pdsh is not installed on this node (or use launch/per_node_no_ssh.sh on each node)"
exec "${cmd[@]}"

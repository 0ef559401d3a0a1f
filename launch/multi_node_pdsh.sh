#!/usr/bin/env bash
# Multi-node from one node: DeepSpeed reads HOSTFILE and starts every node's ranks over pdsh (ssh).
# Needs: pdsh on this node, passwordless ssh from here to every host, and the repository and Python
# environment at the same paths on every node (the remote command is `cd <this directory>; <this python>
# -m deepspeed.launcher.launch ...`). Run from the repository root.
# Only NCCL*/PYTHON*/UCX*/MLFLOW*/MV2* variables and the lines of .deepspeed_env reach the other nodes; write
# that file with launch/write_deepspeed_env.sh to carry WANDB_* and HF_*. DeepSpeed logs the pdsh command with
# every carried variable in it, so secrets (WANDB_API_KEY, HF_TOKEN) never travel that way: each node reads
# them from a mode-600 secrets file (launch/load_secrets.sh, sourced there through --venv_script).
set -euo pipefail

launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/secret_names.sh
source "$launch_dir/secret_names.sh"

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
  COCONUT_SECRETS_FILE
                 mode-600 NAME=value file each node exports before starting its ranks (default:
                 ./.coconut_secrets, else ~/.coconut_secrets; written by launch/write_deepspeed_env.sh)
  DRY_RUN=1      print the command instead of running it
USAGE
}

die() { echo "multi_node_pdsh.sh: $*" >&2; exit 2; }

# The remote command is pasted together as text and run by each node's login shell: a path in it must not
# need quoting.
plain_path() { [[ $1 =~ ^/[A-Za-z0-9_./@%+=:,-]+$ ]]; }

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
    if is_secret_name "${line%%=*}"; then
      die "$env_file line $line_no carries ${line%%=*}: DeepSpeed would put its value on the pdsh command" \
          "line and in its log; keep it in a mode-600 secrets file instead (launch/write_deepspeed_env.sh" \
          "writes one)"
    fi
  done < "$env_file"
done
if [[ $found_env_file == 0 ]] && compgen -e | grep -qE '^(WANDB|HF)_'; then
  echo "multi_node_pdsh.sh: warning: no $env_name in $HOME or $PWD: WANDB_*/HF_* variables set here will" \
       "not reach the other nodes (write it with launch/write_deepspeed_env.sh)" >&2
fi
# DeepSpeed also copies every NCCL*/PYTHON*/MLFLOW*/MV2*/UCX* variable of this shell into the command.
while IFS= read -r name; do
  if [[ $name =~ ^(NCCL|PYTHON|MLFLOW|MV2|UCX) ]] && is_secret_name "$name"; then
    die "$name is set here, and DeepSpeed would put its value on the pdsh command line and in its log;" \
        "unset it and put it in the secrets file"
  fi
done < <(compgen -e)

# Secrets: a file every node reads itself, named on the command line by its path only.
secrets_file=${COCONUT_SECRETS_FILE:-}
if [[ -n $secrets_file ]]; then
  [[ -f $secrets_file ]] || die "COCONUT_SECRETS_FILE '$secrets_file' is not a file"
else
  for candidate in "$PWD/.coconut_secrets" "$HOME/.coconut_secrets"; do
    if [[ -f $candidate ]]; then secrets_file=$candidate; break; fi
  done
fi
if [[ -n $secrets_file ]]; then
  secrets_file=$(cd "$(dirname "$secrets_file")" && pwd)/$(basename "$secrets_file")
  mode=$(stat -c %a "$secrets_file")
  if [[ ! -O $secrets_file ]] || (( 8#$mode & 8#077 )); then
    die "secrets file '$secrets_file' must be owned by you and not readable by others (mode $mode; chmod 600 it)"
  fi
  plain_path "$secrets_file" || die "secrets file path '$secrets_file' must not need shell quoting (move it)"
  plain_path "$launch_dir" || die "repository path '$launch_dir' must not need shell quoting for load_secrets.sh"
else
  for name in WANDB_API_KEY HF_TOKEN; do
    if [[ -n ${!name:-} ]]; then
      echo "multi_node_pdsh.sh: warning: $name is set here but there is no secrets file (./.coconut_secrets," \
           "$HOME/.coconut_secrets or COCONUT_SECRETS_FILE): the other nodes get it only from their own login" \
           "files (~/.netrc for wandb, ~/.cache/huggingface/token for HF); write one with" \
           "launch/write_deepspeed_env.sh" >&2
    fi
  done
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
# DeepSpeed runs `source <venv_script>;` on every node before anything else of the remote command.
if [[ -n $secrets_file ]]; then cmd+=(--venv_script "$launch_dir/load_secrets.sh $secrets_file"); fi
cmd+=(--module coconut_scale.train "$recipe" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
command -v pdsh >/dev/null || die "pdsh is not installed on this node (or use launch/per_node_no_ssh.sh on each node)"
exec "${cmd[@]}"

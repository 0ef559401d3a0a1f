#!/usr/bin/env bash
# Write the WANDB_* and HF_* variables of this shell to a .deepspeed_env file, the only way (besides
# NCCL*/PYTHON*/UCX*/MLFLOW*/MV2*) for a variable to reach the other nodes of a pdsh/ssh launch
# (launch/multi_node_pdsh.sh). Not needed for per-node launches (per_node_no_ssh.sh, slurm.sbatch): there each
# node keeps its own environment.
#
# DeepSpeed reads ~/.deepspeed_env and ./.deepspeed_env (the name can be changed with DS_ENV_FILE), one
# NAME=value per line with nothing else: no comments, no blank lines (it splits every line at '=').
# Each value is pasted into the remote shell command as `export NAME=value;` (double-quoted when it holds
# special characters), so values holding '"', '$', '`' or '\' would be mangled there; they are refused rather
# than silently changed.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: launch/write_deepspeed_env.sh [OUTPUT]

  OUTPUT  file to write (default: ./.deepspeed_env, which deepspeed reads when launched from this directory;
          ~/.deepspeed_env is read too). Written with mode 600: it may hold WANDB_API_KEY / HF_TOKEN.
USAGE
}

die() { echo "write_deepspeed_env.sh: $*" >&2; exit 2; }

case ${1:-} in -h|--help) usage; exit 0 ;; esac
[[ $# -le 1 ]] || { usage; die "expected at most one argument (OUTPUT), got $#"; }
output=${1:-.deepspeed_env}

names=()
while IFS= read -r name; do
  [[ $name =~ ^(WANDB|HF)_ ]] && names+=("$name")
done < <(compgen -e | LC_ALL=C sort)
[[ ${#names[@]} -gt 0 ]] || die "no WANDB_* or HF_* variables are exported in this shell; nothing written"

# mktemp creates the file with mode 600 and the rename keeps it: the file may hold API keys.
tmp=$(mktemp "$output.XXXXXX")
trap 'rm -f "$tmp"' EXIT
for name in "${names[@]}"; do
  value=${!name}
  if [[ $value == *$'\n'* || $value == *[\"\$\`\\]* ]]; then
    die "$name holds a newline, '\"', '\$', '\`' or '\\', which cannot pass through .deepspeed_env intact"
  fi
  printf '%s=%s\n' "$name" "$value" >> "$tmp"
done
mv "$tmp" "$output"
trap - EXIT
echo "wrote ${#names[@]} variables to $output: ${names[*]}" >&2

#!/usr/bin/env bash
# Write the WANDB_* and HF_* variables of this shell for the other nodes of a pdsh/ssh launch
# (launch/multi_node_pdsh.sh): the plain ones to a .deepspeed_env file, the secret ones (WANDB_API_KEY,
# HF_TOKEN, any name ending in KEY/TOKEN/SECRET/PASSWORD) to a separate secrets file with mode 600.
# Not needed for per-node launches (per_node_no_ssh.sh, slurm.sbatch): there each node keeps its own environment.
#
# Why two files: DeepSpeed pastes every .deepspeed_env line into the pdsh command as `export NAME=value;`, and
# logs that command (`cmd = pdsh ...`); `ps` on every node shows it too. The secrets file never goes on a
# command line: each node reads it itself (launch/load_secrets.sh, which multi_node_pdsh.sh has DeepSpeed
# source there), so it must be at the same path on every node (a shared home or repository directory).
#
# DeepSpeed reads ~/.deepspeed_env and ./.deepspeed_env (the name can be changed with DS_ENV_FILE), one
# NAME=value per line with nothing else: no comments, no blank lines (it splits every line at '=').
# Values holding '"', '$', '`' or '\' would be mangled in the remote command; they are refused rather than
# silently changed.
set -euo pipefail

# shellcheck source=launch/secret_names.sh
source "$(dirname "${BASH_SOURCE[0]}")/secret_names.sh"

usage() {
  cat >&2 <<'USAGE'
usage: [COCONUT_SECRETS_FILE=PATH] launch/write_deepspeed_env.sh [OUTPUT]

  OUTPUT                file for the plain variables (default: ./.deepspeed_env, which deepspeed reads when
                        launched from this directory; ~/.deepspeed_env is read too)
  COCONUT_SECRETS_FILE  file for the secret ones, mode 600 (default: .coconut_secrets beside OUTPUT, where
                        multi_node_pdsh.sh looks for it when OUTPUT is ./.deepspeed_env or ~/.deepspeed_env)
USAGE
}

die() { echo "write_deepspeed_env.sh: $*" >&2; exit 2; }

case ${1:-} in -h|--help) usage; exit 0 ;; esac
[[ $# -le 1 ]] || { usage; die "expected at most one argument (OUTPUT), got $#"; }
output=${1:-.deepspeed_env}
secrets_file=${COCONUT_SECRETS_FILE:-$(dirname "$output")/.coconut_secrets}

plain=()
secret=()
while IFS= read -r name; do
  [[ $name =~ ^(WANDB|HF)_ ]] || continue
  if is_secret_name "$name"; then secret+=("$name"); else plain+=("$name"); fi
done < <(compgen -e | LC_ALL=C sort)
[[ $((${#plain[@]} + ${#secret[@]})) -gt 0 ]] || die "no WANDB_* or HF_* variables are exported in this shell; nothing written"

# Check every value before writing anything (messages name the variable, never print a value).
for name in ${plain[@]+"${plain[@]}"}; do
  value=${!name}
  if [[ $value == *$'\n'* || $value == *[\"\$\`\\]* ]]; then
    die "$name holds a newline, '\"', '\$', '\`' or '\\', which cannot pass through .deepspeed_env intact"
  fi
done
for name in ${secret[@]+"${secret[@]}"}; do
  [[ ${!name} != *$'\n'* ]] || die "$name holds a newline, which the secrets file (one NAME=value a line) cannot hold"
done

# write_lines FILE NAME...: NAME=value lines into FILE, atomically. mktemp creates the file with mode 600 and
# the rename keeps it (the plain file stays 600 too: older versions of this script put keys in it).
tmp=
trap 'rm -f "$tmp"' EXIT
write_lines() {
  local file=$1 name
  shift
  tmp=$(mktemp "$file.XXXXXX")
  for name in "$@"; do printf '%s=%s\n' "$name" "${!name}" >> "$tmp"; done
  mv "$tmp" "$file"
  tmp=
}

write_lines "$output" ${plain[@]+"${plain[@]}"}
echo "wrote ${#plain[@]} variables to $output: ${plain[*]-}" >&2
if [[ ${#secret[@]} -gt 0 ]]; then
  write_lines "$secrets_file" "${secret[@]}"
  echo "wrote ${#secret[@]} secrets to $secrets_file (mode 600, read on each node, never on a command line):" \
       "${secret[*]}" >&2
fi

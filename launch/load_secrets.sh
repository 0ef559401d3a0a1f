# shellcheck shell=bash
# Sourced on every node of a pdsh launch, before DeepSpeed's node launcher starts: multi_node_pdsh.sh passes
# `--venv_script "<repo>/launch/load_secrets.sh SECRETS_FILE"`, which DeepSpeed puts in front of the remote
# command as `source ... ;`. Exports the NAME=value lines of SECRETS_FILE (written by write_deepspeed_env.sh,
# mode 600), so WANDB_API_KEY / HF_TOKEN reach the training processes without ever being on a command line.
#
# Sourced into the remote login shell, so it sets no shell options and leaves no helpers behind. When the file
# cannot be trusted (missing, not owned by this user, readable by others, a line that is not NAME=value) it
# says so without printing any value and exits the remote shell, so this node's ranks never start.

_coconut_load_secrets() {
  local file=$1 line line_no=0 mode
  if [[ -z $file || ! -f $file || ! -r $file ]]; then
    echo "load_secrets.sh on $(hostname): cannot read the secrets file '$file'" >&2
    return 2
  fi
  mode=$(stat -c %a "$file")
  if [[ ! -O $file ]] || (( 8#$mode & 8#077 )); then
    echo "load_secrets.sh on $(hostname): '$file' must be owned by $(id -un) and not readable by others" \
         "(mode $mode; chmod 600 it)" >&2
    return 2
  fi
  while IFS= read -r line || [[ -n $line ]]; do
    line_no=$((line_no + 1))
    if ! [[ $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
      echo "load_secrets.sh on $(hostname): '$file' line $line_no is not NAME=value" >&2
      return 2
    fi
    export "${line%%=*}=${line#*=}"
  done < "$file"
}

_coconut_load_secrets "${1:-}" || exit 2
unset -f _coconut_load_secrets

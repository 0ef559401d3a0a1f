# shellcheck shell=bash
# Sourced by write_deepspeed_env.sh and multi_node_pdsh.sh: which variables hold secrets.
# DeepSpeed's pdsh launch pastes every variable it carries (.deepspeed_env lines, and NCCL*/PYTHON*/MLFLOW*/
# MV2*/UCX* from the environment) into the pdsh command line, which it logs and which `ps` shows on the
# node; secrets travel in a 0600 file instead (launch/load_secrets.sh).
# A name is secret when it ends in KEY, TOKEN, SECRET or PASSWORD: WANDB_API_KEY, HF_TOKEN,
# HUGGING_FACE_HUB_TOKEN, MLFLOW_TRACKING_PASSWORD, ... (HF_TOKEN_PATH, a file name, is not).
is_secret_name() { [[ $1 =~ (KEY|TOKEN|SECRET|PASSWORD)$ ]]; }

"""launch/: the launch scripts, run for real where a CPU machine can (single node with 2 ranks, two "nodes"
over loopback with --no_ssh) and in dry-run mode with fake pdsh/ssh/srun/scontrol where it cannot.

The full launch tests (`test_two_nodes_*`, `test_single_node_script_*`) train the tiny recipe to completion
and check what a finished 2-rank run leaves behind. tests/integration/test_train_distributed.py already runs the bare
`deepspeed --num_gpus 2 --module coconut_scale.train` command (and compares it with a single process), so
here the same launch goes through launch/single_node.sh.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
RECIPE = "recipes/tiny_cpu.yaml"
SCRIPTS = ["single_node.sh", "per_node_no_ssh.sh", "multi_node_pdsh.sh", "write_deepspeed_env.sh", "slurm.sbatch"]
SOURCED = ["secret_names.sh", "load_secrets.sh"]  # sourced by the scripts above, or by DeepSpeed on a node
TRAIN_TIMEOUT = 300  # a tiny 2-rank run takes ~40 s on 2 shared cores
QUICK_TIMEOUT = 60

# 16 records / global batch 4 = 4 steps per epoch; 2 epochs (stage 0, then stage 1) = 8 steps.
N_TRAIN, GLOBAL_BATCH, EPOCHS = 16, 4, 2
FINAL_STEP = N_TRAIN // GLOBAL_BATCH * EPOCHS


def _env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # A launcher's own rendezvous variables must not leak in from the test runner's environment.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GPUS_PER_NODE",
                "CUDA_VISIBLE_DEVICES", "DRY_RUN", "DS_ENV_FILE"):
        env.pop(key, None)
    for key in list(env):
        if key.startswith("SLURM_"):
            env.pop(key)
    env.update(extra)
    return env


def _overrides(root: Path) -> list[str]:
    return [
        f"output_dir={root / 'out'}",
        f"data.train_file={root / 'data' / 'train.json'}",
        f"data.val_file={root / 'data' / 'val.json'}",
        f"data.generate={{kind: prosqa_synthetic, n_train: {N_TRAIN}, n_val: 4, seed: 3}}",
        f"optim.epochs={EPOCHS}",
        f"batch.global_batch_size={GLOBAL_BATCH}",
        "batch.micro_batch_size=2",
        "batch.eval_batch_size=4",
        "eval.max_new_tokens=6",
        "logging.log_every_steps=1",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=QUICK_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", REPO)
    kw.setdefault("env", _env())
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _run_together(cmds: list[list[str]], envs: list[dict], logs: list[Path], timeout: float) -> list[int]:
    """Start all commands at once (one per "node"); if one fails, stop the others at once instead of letting
    them wait for a peer that will never come. Each runs in its own session so that a timeout can kill the
    launcher together with the ranks it spawned."""
    procs = []
    for cmd, env, log in zip(cmds, envs, logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"launch did not finish within {timeout} s:\n" + _tails(logs))
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs]


def _tails(logs: list[Path], n=4000) -> str:
    return "\n".join(f"--- {log.name} ---\n{log.read_text()[-n:]}" for log in logs if log.exists())


def _assert_finished_two_rank_run(out: Path, log_text: str):
    """What a completed tiny run with world size 2 leaves behind."""
    assert "done: best accuracy" in log_text
    assert "world size 2 |" in log_text
    # The batch table row at 2 processes: GPUs 2, micro 2, grad_accum 1, global 4.
    assert re.search(r"^\s*2\s+2\s+1\s+4\s", log_text, re.M), log_text[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["global_step"] for r in train] == list(range(1, FINAL_STEP + 1))
    assert [e["stage"] for e in evals] == [0, 1]

    final = out / "checkpoints" / f"step-{FINAL_STEP:08d}"
    state = json.loads((final / "loop_state.json").read_text())
    assert state["global_step"] == FINAL_STEP and state["epoch"] == EPOCHS
    # ZeRO-3 writes one partition per rank: exactly ranks 0 and 1 took part.
    shards = sorted(p.name for p in (final / "ds").glob("zero_pp_rank_*_model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]

    for name in ("stage0", "stage1", "best"):
        hf = out / "hf" / name
        assert (hf / "model.safetensors").stat().st_size > 0, hf
        assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists(), hf
    assert json.loads((out / "hf" / "stage1" / "coconut_config.json").read_text())["stage"] == 1


# ---------------------------------------------------------------------------------------------------------
# Full launches (train the tiny recipe to completion).


@pytest.mark.slow
def test_two_nodes_over_loopback_with_no_ssh_train_to_completion(tmp_path):
    """Two "nodes" on this machine: one hostfile with two names, per_node_no_ssh.sh started twice at once with
    NODE_RANK 0 and 1 (deepspeed --hostfile F --no_ssh --node_rank K), rendezvous on 127.0.0.1."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = str(_free_port())
    cmd = [LAUNCH / "per_node_no_ssh.sh", hostfile, RECIPE, *_overrides(tmp_path)]
    envs = [_env(NODE_RANK=str(k), MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for k in (0, 1)]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    rcs = _run_together([cmd, cmd], envs, logs, TRAIN_TIMEOUT)
    assert rcs == [0, 0], f"exit codes {rcs}\n" + _tails(logs)

    node0, node1 = (log.read_text() for log in logs)
    _assert_finished_two_rank_run(tmp_path / "out", node0)
    # Each launcher ran as its own node of a 2-node world: node 1 hosted global rank 1.
    for k, text in enumerate((node0, node1)):
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in text, text[-3000:]
        assert "dist_world_size=2" in text
    assert "'nodeB': [1]" in node1


@pytest.mark.slow
def test_single_node_script_with_two_ranks_trains_to_completion(tmp_path):
    """The README's launch command, `deepspeed --num_gpus 2 --module coconut_scale.train RECIPE`, through
    launch/single_node.sh on CPU."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    proc = _run([LAUNCH / "single_node.sh", "2", RECIPE, *_overrides(tmp_path)], timeout=TRAIN_TIMEOUT,
                env=_env(MASTER_PORT=str(_free_port())))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _assert_finished_two_rank_run(tmp_path / "out", proc.stdout + proc.stderr)


# ---------------------------------------------------------------------------------------------------------
# Cheap checks: syntax, usage messages, the commands the scripts build.


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_strict(script):
    path = LAUNCH / script
    assert _run(["bash", "-n", path]).returncode == 0
    assert "set -euo pipefail" in path.read_text()
    if script.endswith(".sh"):
        assert os.access(path, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SOURCED)
def test_sourced_file_parses_and_leaves_the_shell_options_alone(script):
    path = LAUNCH / script
    assert _run(["bash", "-n", path]).returncode == 0
    assert not re.search(r"^\s*set\s", path.read_text(), re.M)  # sourced into someone else's shell


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = _run(["shellcheck", "-x", *(LAUNCH / s for s in SCRIPTS + SOURCED)], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script, args, env, missing", [
    ("single_node.sh", [], {}, "NUM_GPUS"),
    ("single_node.sh", ["2"], {}, "RECIPE"),
    ("per_node_no_ssh.sh", [], {}, "HOSTFILE"),
    ("per_node_no_ssh.sh", ["HOSTFILE"], {}, "RECIPE"),
    ("per_node_no_ssh.sh", ["HOSTFILE", RECIPE], {"MASTER_ADDR": "127.0.0.1"}, "NODE_RANK"),
    ("per_node_no_ssh.sh", ["HOSTFILE", RECIPE], {"NODE_RANK": "0"}, "MASTER_ADDR"),
    ("multi_node_pdsh.sh", [], {}, "HOSTFILE"),
    ("multi_node_pdsh.sh", ["HOSTFILE"], {}, "RECIPE"),
    ("slurm.sbatch", [], {}, "RECIPE"),
])
def test_missing_argument_prints_usage_naming_it(script, args, env, missing, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\n")
    args = [str(hostfile) if a == "HOSTFILE" else a for a in args]
    proc = _run(["bash", LAUNCH / script, *args], env=_env(**env))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
    assert f"missing {missing}" in proc.stderr


@pytest.mark.parametrize("script, args, env, bad", [
    ("single_node.sh", ["two", RECIPE], {}, "'two'"),
    ("single_node.sh", ["2", "recipes/nope.yaml"], {}, "'recipes/nope.yaml'"),
    ("per_node_no_ssh.sh", ["HOSTFILE", RECIPE], {"NODE_RANK": "2", "MASTER_ADDR": "h"}, "got '2'"),
    ("per_node_no_ssh.sh", ["HOSTFILE", RECIPE], {"NODE_RANK": "x", "MASTER_ADDR": "h"}, "got 'x'"),
    ("per_node_no_ssh.sh", ["no/such/hostfile", RECIPE], {"NODE_RANK": "0", "MASTER_ADDR": "h"},
     "'no/such/hostfile'"),
    ("per_node_no_ssh.sh", ["HOSTFILE", RECIPE], {"NODE_RANK": "0", "MASTER_ADDR": "h", "GPUS_PER_NODE": "0"},
     "got '0'"),
])
def test_bad_values_are_named(script, args, env, bad, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnodeA slots=1\n\nnodeB slots=1\n")
    args = [str(hostfile) if a == "HOSTFILE" else a for a in args]
    proc = _run(["bash", LAUNCH / script, *args], env=_env(DRY_RUN="1", **env))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert bad in proc.stderr


def test_single_node_dry_run_is_the_readme_command():
    proc = _run([LAUNCH / "single_node.sh", "2", RECIPE, "optim.lr=5e-6", "data.generate={kind: x, n: 1}"],
                env=_env(DRY_RUN="1"))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["deepspeed", "--num_gpus", "2", "--module", "coconut_scale.train", RECIPE,
                                        "optim.lr=5e-6", "data.generate={kind: x, n: 1}"]


def test_per_node_dry_run_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=4\nnodeB slots=4\n")
    proc = _run([LAUNCH / "per_node_no_ssh.sh", hostfile, RECIPE, "a.b=c d"],
                env=_env(DRY_RUN="1", NODE_RANK="1", MASTER_ADDR="10.0.0.1", GPUS_PER_NODE="2"))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr", "10.0.0.1",
        "--master_port", "29500", "--num_gpus", "2", "--module", "coconut_scale.train", RECIPE, "a.b=c d"]


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_slurm_script_gives_each_node_its_rank_and_the_first_host_as_master(tmp_path):
    """slurm.sbatch under fake SLURM: a fake scontrol expands the node list, a fake srun starts one "task"
    per node the way srun does (same environment plus SLURM_NODEID), and DRY_RUN=1 makes each task print
    the deepspeed command it would run."""
    _fake_bin(tmp_path, "scontrol", """#!/bin/sh
[ "$1 $2 $3" = "show hostnames gpu-[7-8]" ] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
printf 'gpu-7\\ngpu-8\\n'
""")
    srun_log = tmp_path / "srun.log"
    bin_dir = _fake_bin(tmp_path, "srun", f"""#!/usr/bin/env bash
set -euo pipefail
echo "$*" > {shlex.quote(str(srun_log))}
nodes=
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${{1#--nodes=}}; shift; done
for ((i = 0; i < nodes; i++)); do
  echo "task $i OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_DEBUG=$NCCL_DEBUG"
  SLURM_NODEID=$i SLURM_PROCID=$i "$@"
done
""")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN="1", SLURM_JOB_NODELIST="gpu-[7-8]",
               SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(REPO),
               HOSTFILE_DIR=str(tmp_path / "hostfiles"))
    for key in ("OMP_NUM_THREADS", "NCCL_DEBUG"):  # unset, so the script's defaults show
        env.pop(key, None)
    proc = _run(["bash", LAUNCH / "slurm.sbatch", RECIPE, "optim.lr=1e-4"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    hostfile = tmp_path / "hostfiles" / "4242.hostfile"
    assert hostfile.read_text() == "gpu-7 slots=4\ngpu-8 slots=4\n"
    srun_args = srun_log.read_text().split()
    assert {"--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=32"} <= set(srun_args)

    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "task 0 OMP_NUM_THREADS=8 NCCL_DEBUG=WARN" and lines[2].startswith("task 1 ")
    for node_rank, line in ((0, lines[1]), (1, lines[3])):
        assert shlex.split(line) == [
            "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "gpu-7", "--master_port", str(29500 + 4242 % 1000), "--num_gpus", "4",
            "--module", "coconut_scale.train", RECIPE, "optim.lr=1e-4"]


def test_slurm_script_outside_slurm_says_so(tmp_path):
    proc = _run(["bash", LAUNCH / "slurm.sbatch", RECIPE], env=_env())
    assert proc.returncode == 2
    assert "SLURM_JOB_NODELIST is not set" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# .deepspeed_env: the writer, the example, and DeepSpeed's own pdsh runner reading the file.


def _writer_env(**variables) -> dict:
    env = {k: v for k, v in _env().items() if not k.startswith(("WANDB", "HF"))}
    env.update(variables)
    return env


PLAIN = {"WANDB_PROJECT": "coconut", "HF_HOME": "/shared/hf cache", "HF_TOKEN_PATH": "/shared/hf/token"}
# Distinctive values, so that "not on the command line, not in the log" can be checked by search.
SECRET = {"WANDB_API_KEY": "wandb-key-5f3a9c", "HF_TOKEN": "hf_tok'en-9c1d$x"}
CARRIED = {**PLAIN, **SECRET}
NOT_CARRIED = {"HFHOME": "x", "MY_WANDB_KEY": "x", "WANDB": "x", "hf_home": "x", "NCCL_DEBUG": "INFO",
               "XHF_TOKEN": "x"}


def _lines(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_deepspeed_env_writer_writes_only_wandb_and_hf_variables_and_secrets_apart(tmp_path):
    out = tmp_path / "dsenv"
    proc = _run([LAUNCH / "write_deepspeed_env.sh", out], env=_writer_env(**CARRIED, **NOT_CARRIED))
    assert proc.returncode == 0, proc.stderr
    assert _lines(out) == PLAIN and len(out.read_text().splitlines()) == len(PLAIN)
    # The secrets go to a file beside it that never becomes part of a command: mode 600.
    secrets = tmp_path / ".coconut_secrets"
    assert _lines(secrets) == SECRET
    for path in (out, secrets):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".coconut_secrets", "dsenv"]
    assert not any(value in proc.stderr for value in SECRET.values())


def test_deepspeed_env_writer_refuses_what_cannot_pass_and_writes_nothing(tmp_path):
    out = tmp_path / "dsenv"
    proc = _run([LAUNCH / "write_deepspeed_env.sh", out], env=_writer_env(WANDB_PROJECT="p", HF_HOME="$HOME/hf"))
    assert proc.returncode == 2 and "HF_HOME" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    proc = _run([LAUNCH / "write_deepspeed_env.sh", out], env=_writer_env(OTHER="1"))
    assert proc.returncode == 2 and "no WANDB_* or HF_*" in proc.stderr
    assert not out.exists()


def test_deepspeed_env_example_and_hostfile_example_parse_the_way_deepspeed_reads_them():
    from deepspeed.launcher.runner import _parse_hostfile

    # DeepSpeed splits every .deepspeed_env line at '=' (runner.main): a comment or blank line would crash it.
    for line in (LAUNCH / "deepspeed_env.example").read_text().splitlines():
        assert re.match(r"^(WANDB|HF)_[A-Z_]+=\S", line), line
    hosts = _parse_hostfile((LAUNCH / "hostfile.example").read_text().splitlines(keepends=True))
    assert len(hosts) >= 2 and all(slots > 0 for slots in hosts.values())


def _pdsh_fakes(tmp_path: Path, play_node: bool = False) -> tuple[Path, Path]:
    """A pdsh that records the command deepspeed hands it, and an ssh that answers deepspeed's ssh check.

    With `play_node`, the fake pdsh then does what pdsh + ssh would do on node 0: run that command through a
    login shell whose environment is a fresh login's (HOME and PATH only, nothing from the launching shell),
    with DeepSpeed's node launcher for real, except that the ranks run the probe module `probe_env` (in the
    launch directory) instead of coconut_scale.train.
    """
    record = tmp_path / "pdsh_argv.json"
    node = """
remote = " ".join(argv[argv.index("-w") + 2:]).replace("%n", "0").replace(" coconut_scale.train ", " probe_env ")
sys.exit(subprocess.call(["bash", "-c", remote], env={"HOME": os.environ["HOME"], "PATH": "/usr/bin:/bin"}))
""" if play_node else ""
    _fake_bin(tmp_path, "pdsh", f"""#!{sys.executable}
import json, os, subprocess, sys
argv = sys.argv[1:]
json.dump(argv, open({str(record)!r}, "w"))
{node}""")
    bin_dir = _fake_bin(tmp_path, "ssh", "#!/bin/sh\necho fake-host\n")
    return bin_dir, record


def _pdsh_launch(tmp_path: Path, play_node: bool = False, work_files: dict | None = None):
    """write_deepspeed_env.sh into ~/, then multi_node_pdsh.sh through DeepSpeed's real runner, launched from a
    directory without a .deepspeed_env of its own (holding only `work_files`). Returns the finished launch, the
    argv the fake pdsh received, and the home directory."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    for name, text in (work_files or {}).items():
        (work / name).write_text(text)
    assert _run([LAUNCH / "write_deepspeed_env.sh", home / ".deepspeed_env"],
                env=_writer_env(**CARRIED)).returncode == 0
    bin_dir, record = _pdsh_fakes(tmp_path, play_node)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    # The secrets are also set in the launching shell, as they would be for whoever ran the writer.
    env = _writer_env(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), MASTER_ADDR="10.0.0.1",
                      MASTER_PORT="29577", WANDB_RUN_GROUP="set-after-the-file-was-written", **SECRET)
    proc = _run([LAUNCH / "multi_node_pdsh.sh", hostfile, REPO / RECIPE, "optim.lr=1e-4", "x.y=a b"],
                cwd=work, env=env, timeout=120)
    argv = json.loads(record.read_text()) if record.exists() else None
    return proc, argv, home


def test_pdsh_launch_carries_deepspeed_env_to_the_other_nodes_and_no_secret_on_the_command_line(tmp_path):
    """multi_node_pdsh.sh through DeepSpeed's real runner, up to the pdsh call: the plain WANDB_*/HF_* lines that
    write_deepspeed_env.sh put in ~/.deepspeed_env become `export` commands run on every node, nothing else from
    this shell's WANDB_*/HF_* does, and the secrets appear neither in pdsh's command line nor in the log."""
    proc, argv, home = _pdsh_launch(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert argv[argv.index("-w") + 1] == "nodeA,nodeB"
    remote = " ".join(argv)
    for key, value in PLAIN.items():
        quoted = value if re.fullmatch(r"[\w@%+=:,./-]+", value) else f'"{value}"'
        assert f"export {key}={quoted};" in remote, (key, remote)
    assert "WANDB_RUN_GROUP" not in remote  # only the file's lines travel
    for key, value in SECRET.items():
        assert value not in remote and f"export {key}=" not in remote, (key, remote)
        assert value not in proc.stdout + proc.stderr, key  # DeepSpeed logs `cmd = pdsh ...`
    # Each node reads them itself, before anything else of the command runs.
    assert remote.split(" -w nodeA,nodeB ", 1)[1].startswith(
        f"source {LAUNCH}/load_secrets.sh {home}/.coconut_secrets; export ")
    assert "--node_rank=%n" in remote and "--master_addr=10.0.0.1" in remote and "--master_port=29577" in remote
    assert "--module" in argv
    # deepspeed quotes arguments with spaces for the remote shell
    assert argv[-4:] == ["coconut_scale.train", str(REPO / RECIPE), "optim.lr=1e-4", '"x.y=a b"']


PROBE = """import json, os, sys
keys = {keys!r}
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{k: os.environ.get(k) for k in keys}}, f)
"""


@pytest.mark.slow  # DeepSpeed's node launcher starts two ranks
def test_pdsh_launch_secrets_reach_the_training_processes_on_the_node(tmp_path):
    """The other half: on a node (a fresh login environment), the ranks DeepSpeed's node launcher starts see
    WANDB_API_KEY and HF_TOKEN (from the secrets file) and the plain variables (from the exports)."""
    seen = tmp_path / "seen"
    seen.mkdir()
    probe = PROBE.format(keys=sorted(CARRIED), out=str(seen))
    proc, argv, _ = _pdsh_launch(tmp_path, play_node=True, work_files={"probe_env.py": probe})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = sorted(p.name for p in seen.iterdir())
    assert ranks == ["rank0.json", "rank1.json"], proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ranks:
        assert json.loads((seen / name).read_text()) == CARRIED, name
    assert not any(value in " ".join(argv) + proc.stdout + proc.stderr for value in SECRET.values())


def test_pdsh_script_rejects_a_deepspeed_env_deepspeed_would_misread(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("WANDB_PROJECT=coconut\n# carried to every node\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    proc = _run([LAUNCH / "multi_node_pdsh.sh", hostfile, REPO / RECIPE], cwd=tmp_path,
                env=_env(HOME=str(home), DRY_RUN="1"))
    assert proc.returncode == 2
    assert "line 2" in proc.stderr and "# carried to every node" in proc.stderr


def _two_hosts(tmp_path: Path) -> Path:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    return hostfile


def test_pdsh_script_refuses_a_deepspeed_env_that_carries_a_secret_without_printing_it(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text(f"WANDB_PROJECT=coconut\nHF_TOKEN={SECRET['HF_TOKEN']}\n")
    proc = _run([LAUNCH / "multi_node_pdsh.sh", _two_hosts(tmp_path), REPO / RECIPE], cwd=tmp_path,
                env=_writer_env(HOME=str(home), DRY_RUN="1"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{home / '.deepspeed_env'} line 2 carries HF_TOKEN" in proc.stderr
    assert SECRET["HF_TOKEN"] not in proc.stdout + proc.stderr


def test_pdsh_script_refuses_a_secret_deepspeed_would_copy_from_this_shell(tmp_path):
    proc = _run([LAUNCH / "multi_node_pdsh.sh", _two_hosts(tmp_path), REPO / RECIPE], cwd=tmp_path,
                env=_writer_env(HOME=str(tmp_path), DRY_RUN="1", MLFLOW_TRACKING_PASSWORD="pw-77aa"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MLFLOW_TRACKING_PASSWORD is set here" in proc.stderr and "pw-77aa" not in proc.stderr


def test_pdsh_script_refuses_a_secrets_file_others_can_read(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.write_text(f"WANDB_API_KEY={SECRET['WANDB_API_KEY']}\n")
    secrets.chmod(0o640)
    proc = _run([LAUNCH / "multi_node_pdsh.sh", _two_hosts(tmp_path), REPO / RECIPE], cwd=tmp_path,
                env=_writer_env(HOME=str(tmp_path), DRY_RUN="1", COCONUT_SECRETS_FILE=str(secrets)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"'{secrets}' must be owned by you and not readable by others (mode 640" in proc.stderr
    secrets.chmod(0o600)
    proc = _run([LAUNCH / "multi_node_pdsh.sh", _two_hosts(tmp_path), REPO / RECIPE], cwd=tmp_path,
                env=_writer_env(HOME=str(tmp_path), DRY_RUN="1", COCONUT_SECRETS_FILE=str(secrets)))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[5:7] == ["--venv_script", f"{LAUNCH}/load_secrets.sh {secrets}"]


@pytest.mark.parametrize("mode, content, error", [
    (0o600, None, None),
    (0o644, None, "not readable by others (mode 644"),
    (0o600, "WANDB_API_KEY {value}\n", "line 1 is not NAME=value"),
])
def test_load_secrets_on_a_node_exports_a_private_file_and_stops_the_node_otherwise(tmp_path, mode, content, error):
    """What each node runs first (`source load_secrets.sh FILE; <DeepSpeed's node launcher>`): the secrets are
    exported for the launcher and its ranks, or the node's shell exits before starting anything, without
    printing a value."""
    value = SECRET["HF_TOKEN"]
    secrets = tmp_path / "secrets"
    secrets.write_text((content or "HF_TOKEN={value}\n").format(value=value))
    secrets.chmod(mode)
    remote = f"source {LAUNCH}/load_secrets.sh {secrets}; echo \"started HF_TOKEN=$HF_TOKEN\""
    proc = _run(["bash", "-c", remote], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    if error is None:
        assert proc.returncode == 0 and proc.stdout == f"started HF_TOKEN={value}\n", proc.stderr
    else:
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert error in proc.stderr and value not in proc.stderr


def test_pdsh_script_warns_when_a_secret_is_set_here_but_no_secrets_file_carries_it(tmp_path):
    proc = _run([LAUNCH / "multi_node_pdsh.sh", _two_hosts(tmp_path), REPO / RECIPE], cwd=tmp_path,
                env=_writer_env(HOME=str(tmp_path), DRY_RUN="1", WANDB_API_KEY=SECRET["WANDB_API_KEY"]))
    assert proc.returncode == 0, proc.stderr
    assert "WANDB_API_KEY is set here but there is no secrets file" in proc.stderr
    assert "--venv_script" not in proc.stdout and SECRET["WANDB_API_KEY"] not in proc.stdout + proc.stderr


def test_pdsh_script_warns_when_wandb_variables_would_not_travel(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    proc = _run([LAUNCH / "multi_node_pdsh.sh", hostfile, REPO / RECIPE], cwd=tmp_path,
                env=_writer_env(HOME=str(home), DRY_RUN="1", WANDB_PROJECT="p"))
    assert proc.returncode == 0, proc.stderr
    assert "will not reach the other nodes" in proc.stderr
    assert shlex.split(proc.stdout)[:4] == ["deepspeed", "--hostfile", str(hostfile), "--launcher"]

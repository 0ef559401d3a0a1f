"""launch/: the launch scripts, run for real where a CPU machine can (single node with 2 ranks, two "nodes"
over loopback with --no_ssh) and in dry-run mode with fake pdsh/ssh/srun/scontrol where it cannot.

The full launch tests (`test_two_nodes_*`, `test_single_node_script_*`) train the tiny recipe to completion
and check what a finished 2-rank run leaves behind. tests/test_train_distributed.py already runs the bare
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

from conftest import REPO

LAUNCH = REPO / "launch"
RECIPE = "recipes/tiny_cpu.yaml"
SCRIPTS = ["single_node.sh", "per_node_no_ssh.sh", "multi_node_pdsh.sh", "write_deepspeed_env.sh", "slurm.sbatch"]
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


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = _run(["shellcheck", *(LAUNCH / s for s in SCRIPTS)])
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


CARRIED = {"WANDB_PROJECT": "coconut", "WANDB_API_KEY": "k-123", "HF_HOME": "/shared/hf cache", "HF_TOKEN": "t'ok"}
NOT_CARRIED = {"HFHOME": "x", "MY_WANDB_KEY": "x", "WANDB": "x", "hf_home": "x", "NCCL_DEBUG": "INFO",
               "XHF_TOKEN": "x"}


def test_deepspeed_env_writer_writes_only_wandb_and_hf_variables(tmp_path):
    out = tmp_path / "dsenv"
    proc = _run([LAUNCH / "write_deepspeed_env.sh", out], env=_writer_env(**CARRIED, **NOT_CARRIED))
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert dict(line.split("=", 1) for line in lines) == CARRIED
    assert len(lines) == len(CARRIED)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it may hold API keys


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


def _pdsh_fakes(tmp_path: Path) -> tuple[Path, Path]:
    """A pdsh that records the command deepspeed hands it, and an ssh that answers deepspeed's ssh check."""
    record = tmp_path / "pdsh_argv.json"
    _fake_bin(tmp_path, "pdsh", f"""#!{sys.executable}
import json, sys
json.dump(sys.argv[1:], open({str(record)!r}, "w"))
""")
    bin_dir = _fake_bin(tmp_path, "ssh", "#!/bin/sh\necho fake-host\n")
    return bin_dir, record


def test_pdsh_launch_carries_deepspeed_env_to_the_other_nodes(tmp_path):
    """multi_node_pdsh.sh through DeepSpeed's real runner, up to the pdsh call: the WANDB_*/HF_* lines that
    write_deepspeed_env.sh put in ~/.deepspeed_env become `export` commands run on every node, and nothing
    else from this shell's WANDB_*/HF_* does."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    home, work = tmp_path / "home", tmp_path / "work"  # cwd without a .deepspeed_env of its own
    home.mkdir()
    work.mkdir()
    assert _run([LAUNCH / "write_deepspeed_env.sh", home / ".deepspeed_env"],
                env=_writer_env(**CARRIED)).returncode == 0
    bin_dir, record = _pdsh_fakes(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    env = _writer_env(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), MASTER_ADDR="10.0.0.1",
                      MASTER_PORT="29577", WANDB_RUN_GROUP="set-after-the-file-was-written")
    proc = _run([LAUNCH / "multi_node_pdsh.sh", hostfile, REPO / RECIPE, "optim.lr=1e-4", "x.y=a b"],
                cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    argv = json.loads(record.read_text())
    assert argv[argv.index("-w") + 1] == "nodeA,nodeB"
    remote = " ".join(argv)
    for key, value in CARRIED.items():
        quoted = value if re.fullmatch(r"[\w@%+=:,./-]+", value) else f'"{value}"'
        assert f"export {key}={quoted};" in remote, (key, remote)
    assert "WANDB_RUN_GROUP" not in remote  # only the file's lines travel
    assert "--node_rank=%n" in remote and "--master_addr=10.0.0.1" in remote and "--master_port=29577" in remote
    assert "--module" in argv
    # deepspeed quotes arguments with spaces for the remote shell
    assert argv[-4:] == ["coconut_scale.train", str(REPO / RECIPE), "optim.lr=1e-4", '"x.y=a b"']


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

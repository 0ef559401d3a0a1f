"""A rank that dies or hangs ends the run on every other rank within distributed.timeout_s, under the per-node
launcher (launch/per_node_no_ssh.sh, no torchrun agent watching): two "nodes" on loopback, one rank each; one rank
is killed (SIGKILL) or frozen (SIGSTOP) mid-training, and the other node's rank and launcher exit non-zero with one
line naming the collective timeout."""

import os
import signal
import socket
import time

import psutil
import pytest

import fault_runs as fr

pytestmark = pytest.mark.slow
TIMEOUT_S = 20
LAUNCH_SLACK_S = 15  # the launcher polls its ranks once a second; process exit and teardown


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_of(launcher: psutil.Process) -> psutil.Process:
    """The training rank a node's launcher started (the process with --local_rank on its command line)."""
    deadline = time.monotonic() + fr.TIMEOUT
    while time.monotonic() < deadline:
        ranks = [p for p in launcher.children(recursive=True) if any("--local_rank" in a for a in p.cmdline())]
        if ranks:
            return ranks[0]
        time.sleep(0.2)
    raise AssertionError("no rank process appeared")


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_rank_stops_the_other_node_within_the_timeout(tmp_path, fault):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    out, data = tmp_path / "out", tmp_path / "data"
    args = fr.overrides(out, data, **{"distributed.timeout_s": TIMEOUT_S, "optim.epochs": 50})
    port = str(_port())
    nodes, logs = [], []
    for node in (0, 1):
        log = tmp_path / f"node{node}.log"
        logs.append(log)
        with open(log, "w") as fh:
            nodes.append(psutil.Popen([str(fr.REPO / "launch" / "per_node_no_ssh.sh"), str(hostfile), str(fr.RECIPE),
                                       *args], cwd=fr.REPO, stdout=fh, stderr=fh, start_new_session=True,
                                      env=fr.env(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)))
    try:
        victim = _rank_of(nodes[1])
        deadline = time.monotonic() + fr.TIMEOUT
        while max(fr.losses(out), default=0) < 2 if (out / "metrics.jsonl").exists() else True:
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.1)
        victim.send_signal(fault)
        hit = time.monotonic()
        survivor = nodes[0]
        survivor.wait(timeout=TIMEOUT_S + LAUNCH_SLACK_S)
        took = time.monotonic() - hit
        if fault == signal.SIGKILL:
            nodes[1].wait(timeout=LAUNCH_SLACK_S)
            assert nodes[1].returncode != 0
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait()
    text = logs[0].read_text()
    errors = [line for line in text.splitlines() if "error: " in line]
    print(f"{fault.name}: the other node exited {survivor.returncode} after {took:.1f} s: {errors}")
    assert survivor.returncode != 0 and took < TIMEOUT_S + LAUNCH_SLACK_S
    assert any("distributed.timeout_s" in line for line in errors), text[-3000:]

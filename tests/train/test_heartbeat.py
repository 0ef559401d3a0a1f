"""Without a terminal, a slow run prints a line at least every HEARTBEAT_S while it trains, from rank 0's own clock:
no collective, nothing read from the device; and a CPU run with more torch threads than idle cores is told so."""

from types import SimpleNamespace

from coconut_scale.train import run_log
from coconut_scale.train.run_log import RunLog


def test_a_line_once_the_heartbeat_interval_passed_with_the_pace_and_what_is_left(tmp_path, capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(run_log.time, "monotonic", lambda: clock[0])
    log = RunLog(tmp_path)
    no_terminal = SimpleNamespace(disable=True)
    log.heartbeat(no_terminal, 1, 48, "epoch 0 stage 0")
    assert capsys.readouterr().out == ""  # just started: nothing to say yet
    clock[0] += run_log.HEARTBEAT_S + 1
    log.heartbeat(no_terminal, 2, 48, "epoch 0 stage 0")
    assert capsys.readouterr().out == "step 2/48 epoch 0 stage 0: training\n"
    clock[0] += 30.0
    log.heartbeat(no_terminal, 3, 48, "epoch 0 stage 0")
    assert capsys.readouterr().out == ""  # within the interval of the last line
    clock[0] += 90.0  # 120 s for steps 2 -> 5: 40 s a step, 43 steps left
    log.heartbeat(no_terminal, 5, 48, "epoch 0 stage 0")
    assert capsys.readouterr().out == "step 5/48 epoch 0 stage 0: training, 40.0 s/step, ~29 min of training left\n"
    log.print("exported HF model -> x")  # any line restarts the interval
    clock[0] += run_log.HEARTBEAT_S - 1
    log.heartbeat(no_terminal, 6, 48, "epoch 0 stage 0")
    assert capsys.readouterr().out == "exported HF model -> x\n"


def test_no_heartbeat_on_a_terminal_where_the_bar_shows_progress(tmp_path, capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(run_log.time, "monotonic", lambda: clock[0])
    log = RunLog(tmp_path)
    clock[0] += 10 * run_log.HEARTBEAT_S
    log.heartbeat(SimpleNamespace(disable=False), 2, 48, "epoch 0 stage 0")
    assert capsys.readouterr().out == ""


def test_a_cpu_run_with_more_threads_than_idle_cores_is_told_to_use_one(monkeypatch):
    monkeypatch.setattr(run_log.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run_log.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(run_log.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(run_log.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    note = run_log.cpu_threads_note()
    assert note.startswith("note: 2 torch threads on 2 cores at load 5.0") and "OMP_NUM_THREADS=1" in note
    monkeypatch.setattr(run_log.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert run_log.cpu_threads_note() is None  # idle cores: two threads are the faster
    monkeypatch.setattr(run_log.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(run_log.torch, "get_num_threads", lambda: 1)
    assert run_log.cpu_threads_note() is None

"""Without a terminal, a slow run prints a line at least every HEARTBEAT_S while it trains, from rank 0's own clock:
no collective, nothing read from the device."""

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

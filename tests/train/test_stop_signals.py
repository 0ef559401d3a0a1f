"""checkpoint.on_signal in one process: the handler only notes the signal (the loop stops at its next step boundary),
SIGUSR1 and SIGTERM by default, and the previous handlers come back on close."""

import os
import signal

import pytest

from coconut_scale.config.recipe import RecipeError, load_recipe
from coconut_scale.train.preemption import PREEMPTED_EXIT, StopSignals

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


def test_sigusr1_and_sigterm_are_noted_not_fatal_by_default():
    names = load_recipe(RECIPE).checkpoint.on_signal
    assert names == ["SIGTERM", "SIGUSR1"] and PREEMPTED_EXIT == 75
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(names).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGUSR1" and stop.agreed()  # the first one is named
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_on_signal_names_only_catchable_stop_signals():
    with pytest.raises(RecipeError, match=r"checkpoint\.on_signal\.0 = 'SIGKILL'"):
        load_recipe(RECIPE, ["checkpoint.on_signal=[SIGKILL]"])
    assert StopSignals(load_recipe(RECIPE, ["checkpoint.on_signal=[]"]).checkpoint.on_signal).install().names == []

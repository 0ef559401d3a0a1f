"""The test helpers that start child processes behave the same however the suite itself was started."""

import signal
import subprocess
import sys

from child_process import default_sigint, subprocess_env

CHILD = "import signal, sys, time; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True); " \
        "time.sleep(float(sys.argv[1]))"


def test_a_child_started_with_default_sigint_takes_ctrl_c_when_the_suite_ignores_sigint():
    """A suite started in the background by a shell without job control has SIGINT ignored, and children inherit
    that: the Ctrl-C test's run would not stop. default_sigint gives the child Python's KeyboardInterrupt back."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `pytest ... &` in a script leaves it
    try:
        plain = subprocess.run([sys.executable, "-c", CHILD, "0"], env=subprocess_env(), capture_output=True,
                               text=True, timeout=60)
        assert plain.stdout.strip() == "False"  # the premise: the inherited disposition hides Ctrl-C
        proc = subprocess.Popen([sys.executable, "-c", CHILD, "60"], env=subprocess_env(), stdout=subprocess.PIPE,
                                text=True, preexec_fn=default_sigint)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        assert proc.stdout.readline().strip() == "True"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == -signal.SIGINT  # an uncaught KeyboardInterrupt ends Python by SIGINT
    finally:
        proc.kill()
        proc.wait()

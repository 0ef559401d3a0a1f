"""A CPU run's glibc malloc settings: applied on the CPU only, opt-out honoured, and they remove the page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from coconut_scale.train import cpu_malloc
from coconut_scale.train.cpu_malloc import M_MMAP_MAX, M_TRIM_THRESHOLD, OPT_OUT, tune_cpu_malloc


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return self.result


def test_applied_on_cpu_and_logged():
    libc = FakeLibc()
    line = tune_cpu_malloc(True, environ={}, libc=libc)
    assert dict(libc.calls) == {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: cpu_malloc.TRIM_THRESHOLD}
    assert line.startswith("malloc: CPU run") and f"{OPT_OUT}=0" in line


def test_not_applied_off_the_cpu_or_when_opted_out():
    libc = FakeLibc()
    assert tune_cpu_malloc(False, environ={}, libc=libc) is None
    assert "defaults kept" in tune_cpu_malloc(True, environ={OPT_OUT: "0"}, libc=libc)
    assert libc.calls == []


def test_a_bad_opt_out_value_is_named():
    with pytest.raises(ValueError, match=rf"{OPT_OUT}='maybe'"):
        tune_cpu_malloc(True, environ={OPT_OUT: "maybe"}, libc=FakeLibc())


def test_a_refused_option_is_said():
    assert "refused" in tune_cpu_malloc(True, environ={}, libc=FakeLibc(result=0))


# A step's activations: four 16 MiB tensors and their products, and one 64 MiB tensor (above glibc's largest mmap
# threshold), allocated, filled and freed every step. With the defaults the 64 MiB one is mmapped and faulted in
# anew each step; tuned, once the heap holds the step, its pages are reused.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from coconut_scale.train.cpu_malloc import tune_cpu_malloc
    if sys.argv[1] == "tuned":
        assert tune_cpu_malloc(True, environ={}).startswith("malloc: CPU run")
    def step():
        xs = [torch.empty(2**22).fill_(1.0) for _ in range(4)]
        ys = [x * 2 for x in xs]
        z = torch.empty(2**24).fill_(1.0)
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(cpu_malloc._glibc() is None, reason="glibc only")
def test_tuned_malloc_reuses_freed_pages_the_default_faults_in_again():
    def faults(setting):
        out = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    pages = 4 * 2**26 // 4096  # four steps' 64 MiB tensors in 4 KiB pages
    default, tuned = faults("default"), faults("tuned")
    assert default > pages * 0.9, default
    # tuned: at most one step's 64 MiB faulted in over the four (the heap may still grow once), not every step's
    assert tuned <= pages // 4, tuned

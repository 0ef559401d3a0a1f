"""At most one host read-back per optimizer step in the training loop (issue: each one stalls a GPU's stream).

count_host_syncs.py trains one stage-2 epoch (two latent passes per micro-batch, 4 micro-batches per step,
ZeRO-3, latent-safe checkpointing) with `Tensor.item/tolist/__bool__/__int__/__float__` wrapped, and reports
each optimizer step's calls by the first caller outside torch. The loop's own code (coconut_scale outside the
host-side data wing) may read back once per step: the non-finite guard's one `tolist` of the step's losses and
gradient norm. The pass plan comes from the collator's host-side metadata, the token count from the features.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from child_process import subprocess_env
from count_host_syncs import package_path

REPO = Path(__file__).resolve().parents[2]


def _callers(calls: dict, prefix: str) -> Counter:
    return Counter({k: v for k, v in calls.items() if k.startswith(prefix)})


def test_callers_are_named_from_the_innermost_package_folder_in_a_clone_named_like_the_package():
    """A newcomer's `git clone` makes .../coconut_scale/coconut_scale/data/sampler.py: the report must say
    coconut_scale/data/sampler.py, or the loop's read-backs are not told apart from the data wing's."""
    clone = Path("/home/me/coconut_scale")
    packages = {"coconut_scale": clone / "coconut_scale", "deepspeed": Path("/venv/site-packages/deepspeed")}
    assert package_path(f"{clone}/coconut_scale/data/sampler.py", packages) == "coconut_scale/data/sampler.py"
    assert package_path(f"{clone}/coconut_scale/train/nonfinite_guard.py", packages) == \
        "coconut_scale/train/nonfinite_guard.py"
    assert package_path(f"{clone}/tests/train/count_host_syncs.py", packages) == "count_host_syncs.py"
    assert package_path("/venv/site-packages/deepspeed/runtime/engine.py", packages) == "deepspeed/runtime/engine.py"
    # Where this checkout's package is imported from, whatever the checkout's folder is named.
    assert package_path(str(REPO / "coconut_scale" / "data" / "sampler.py")) == "coconut_scale/data/sampler.py"


@pytest.mark.slow
def test_one_host_sync_per_optimizer_step(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "count_host_syncs.py"), str(tmp_path / "run"),
                           str(tmp_path / "data")], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    steps, calls = report["steps"], {int(k): v for k, v in report["calls"].items()}
    assert steps >= 3 and report["grad_accum"] >= 2
    for step in range(1, steps + 1):
        ours = _callers(calls.get(step, {}), "coconut_scale/") - _callers(calls.get(step, {}), "coconut_scale/data/")
        assert sum(ours.values()) == 1 and all(k.startswith("coconut_scale/train/nonfinite_guard.py") for k in ours), \
            (step, dict(ours))
        assert not _callers(calls.get(step, {}), "coconut_scale/model/"), (step, calls[step])
    # After the last step's guard: the epoch's closing log line (loss and gradient norm), a logged step's reads.
    closing = _callers(calls.get(steps + 1, {}), "coconut_scale/")
    assert 1 <= sum(closing.values()) <= 2 and all("trainer.py" in k or "strategy.py" in k for k in closing), closing

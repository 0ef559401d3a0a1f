""".ci/run runs the README's test command once, from a clone of the commit under test whose folder is named
coconut_scale, as a newcomer's `git clone` names it. `python`/`python3` are stubs here that record where and how
they were called: nothing is installed and the suite is not run."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUB = """#!/bin/sh
printf '%s\\t%s\\t%s\\t%s\\n' "$PWD" "$(git rev-parse HEAD 2>/dev/null)" \
  "DS_ACCELERATOR=$DS_ACCELERATOR WANDB_MODE=$WANDB_MODE OMP_NUM_THREADS=$OMP_NUM_THREADS" "$*" >> "$STUB_LOG"
"""


def readme_test_command() -> tuple[dict, list[str]]:
    """The README's "Run the tests" command after `bash scripts/install.sh &&`: its variables and its argv."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.*?)\n```", text, re.S).group(1)
    install, tests = block.split(" && ")
    assert install == "bash scripts/install.sh"
    words = shlex.split(tests)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    return env, [w for w in words if w not in {f"{k}={v}" for k, v in env.items()}]


def test_ci_runs_the_readmes_test_command_once_from_a_clone_named_coconut_scale(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout: .ci/run clones the repository")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.tsv"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log),
               TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    want_env, want_argv = readme_test_command()
    assert want_argv[0] == "python" and want_argv[1:3] == ["-m", "pytest"]
    suite = [c for c in calls if c[3].startswith("-m pytest")]
    assert len(suite) == 1, calls  # once: the suite is most of CI's time
    cwd, commit, variables, args = suite[0]
    assert args.split() == want_argv[1:]
    assert dict(v.split("=", 1) for v in variables.split()) == want_env
    assert Path(cwd).name == "coconut_scale" and Path(cwd) != REPO, cwd
    assert commit == head.stdout.strip()
    assert any("pip install" in c[3] and c[0] == str(REPO) for c in calls), calls  # install.sh ran, from the checkout
    assert not list(tmp_path.glob("coconut-ci.*")), "the clone is removed at the end"

"""docs/evaluation.md cannot drift: every `python -m coconut_scale...` (or `coconut-scale ...`) command in its code
blocks runs here, as written, and must exit 0 and write the files the page lists.

The commands run from a scratch directory laid out like the demo's: `runs/demo_cpu/hf/{stage0,stage2}` hold a tiny
exported Llama (tiny_export.py's), `data/generated/demo_smol_val.json` a tiny ProsQA-style file, and
`runs/demo_cpu/metrics.jsonl` a short training log. `torchrun` lines are left to test_eval_cli's 2-rank test.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from child_process import subprocess_env
from tiny_export import build_tiny_export

from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.loading import build_coconut, save_exported
from coconut_scale.model.tokens import LatentTokens

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "evaluation.md"
DEMO_RUN = Path("runs/demo_cpu")
DEMO_DATA = Path("data/generated/demo_smol_val.json")

# tool module -> (name in the default output directory, the files the page says it writes)
OUTPUTS = {
    "coconut_scale.eval": ("generation", ("report.json", "samples.jsonl", "tokens.png")),
    "coconut_scale.evaluate.noise_sweep": ("noise_sweep", ("noise_sweep.json", "noise_sweep.png")),
    "coconut_scale.evaluate.ablations": ("ablations", ("ablations.json", "ablations.md", "ablations.png")),
    "coconut_scale.evaluate.probing": ("probing", ("probing.json", "probes.jsonl", "probing.png")),
    "coconut_scale.evaluate.curves": ("curves", ("curves.json", "curves.png")),
}
# The console script's subcommands (coconut-scale eval|noise-sweep|...) and the modules they stand for.
SUBCOMMANDS = {"eval": "coconut_scale.eval", "noise-sweep": "coconut_scale.evaluate.noise_sweep",
               "ablations": "coconut_scale.evaluate.ablations", "probing": "coconut_scale.evaluate.probing",
               "curves": "coconut_scale.evaluate.curves"}


def doc_commands(text: str) -> list[str]:
    """Commands in the page's fenced code blocks that start with `python -m coconut_scale` or `coconut-scale`."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line.startswith(("python -m coconut_scale", "coconut-scale ")):
                commands.append(line)
    return commands


COMMANDS = doc_commands(DOC.read_text())


def module_of(argv: list[str]) -> str:
    return argv[2] if argv[0] == "python" else SUBCOMMANDS[argv[1]]


def test_the_page_documents_every_tool():
    assert {module_of(shlex.split(c, comments=True)) for c in COMMANDS} == set(OUTPUTS)
    text = DOC.read_text()
    for _, files in OUTPUTS.values():
        for name in files:
            assert f"`{name}`" in text, f"{DOC} does not name {name}"


def _train_line(step: int, stage: int, loss: float) -> dict:
    return {"kind": "train", "global_step": step, "epoch": step // 20, "stage": stage, "loss": loss, "lr": 1e-3,
            "tokens_per_s": 100.0, "latent_passes": stage}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A directory laid out like the demo's outputs, with tiny stand-ins."""
    root = tmp_path_factory.mktemp("demo_layout")
    tiny = build_tiny_export(root / DEMO_RUN)  # writes runs/demo_cpu/hf/stage2 and a data file beside it
    meta = ExportMeta(c_thought=1, tokens=LatentTokens.from_tokenizer(tiny.tokenizer), stage=0, max_latent_stage=2)
    save_exported(build_coconut(tiny.base, tiny.tokenizer), tiny.tokenizer, root / DEMO_RUN / "hf" / "stage0", meta)
    (root / DEMO_DATA).parent.mkdir(parents=True)
    shutil.copy(tiny.data, root / DEMO_DATA)
    lines = [_train_line(10, 0, 2.0), _train_line(20, 0, 1.5),
             {"kind": "eval", "epoch": 1, "stage": 0, "global_step": 20, "val_loss": 1.4, "accuracy": 0.5},
             _train_line(30, 1, 1.2), _train_line(40, 1, 1.0),
             {"kind": "eval", "epoch": 3, "stage": 1, "global_step": 40, "val_loss": 1.1, "accuracy": 0.4}]
    (root / DEMO_RUN / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def expected_out_dir(argv: list[str]) -> Path:
    """Where the page says the outputs go: runs/<name>/eval/<export>/<tool>-stage<K>, or RUN/curves."""
    tool, _ = OUTPUTS[module_of(argv)]
    first = 3 if argv[0] == "python" else 2
    if tool == "curves":
        return Path(argv[first]) / "curves"
    export = Path(argv[first])
    stage = int(argv[argv.index("--stage") + 1]) if "--stage" in argv else int(export.name.removeprefix("stage"))
    return export.parent.parent / "eval" / export.name / f"{tool}-stage{stage}"


@pytest.mark.slow  # each command is a child process that loads the export and runs its tool (7-16 s)
@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_runs(demo_dir, command):
    argv = shlex.split(command, comments=True)
    assert "--out" not in argv, "the page's commands show the default output directory"
    if argv[0] == "python":
        run = [sys.executable, *argv[1:]]
    elif shutil.which("coconut-scale"):
        run = argv
    else:
        pytest.skip("the coconut-scale console script is not installed")
    proc = subprocess.run(run, cwd=demo_dir, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = demo_dir / expected_out_dir(argv)
    assert str(out.relative_to(demo_dir)) in proc.stdout, "the command does not report the documented directory"
    for name in OUTPUTS[module_of(argv)][1]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{command}: no {out / name}"

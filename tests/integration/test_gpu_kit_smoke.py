"""The GPU kit cannot rot: benchmarks/gpu_validate.py --smoke runs every stage on tiny shapes on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every stage, DeepSpeed engines included, on the CPU (about a minute)
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_validate.py"
STAGES = ("environment", "gpu_tests", "llama8b_lora", "gpt2_fast_vs_reference", "memory_estimate", "fair_floor", "profile",
          "fake_vs_real")


def test_gpu_validate_smoke_runs_every_stage(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=170)
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["stages"]
    assert set(stages) == set(STAGES), proc.stdout[-3000:]  # (the JSON writer sorts keys)
    for name, result in stages.items():
        # Every stage either measured (status ok) or recorded why not; in the smoke run all must run.
        assert result["status"] == "ok", f"{name}: {json.dumps(result)[:3000]}"
        assert result["seconds"] >= 0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stages["gpu_tests"]["collect_only"] and "collected" in stages["gpu_tests"]["summary"]
    llama = stages["llama8b_lora"]
    assert llama["best_micro_batch"] == llama["sweep"][-1]["micro_batch"] and llama["tokens_per_s"] > 0
    sweep = llama["sweep"][-1]
    # 6 latents: a prefix pass, 5 one-column latent passes and the final pass, each timed forward and backward.
    assert sweep["passes"] == 7 and sweep["latent_passes"] == [1, 2, 3, 4, 5]
    assert all(ms > 0 for ms in sweep["pass_forward_ms"] + sweep["pass_backward_ms"])
    assert 0 < llama["latent_share"] < 1 and llama["mfu"] > 0
    assert stages["gpt2_fast_vs_reference"]["train_speedup"] > 0
    memory = stages["memory_estimate"]
    assert memory["llama8b_lora"]["estimate_gib"] > 0 and memory["qwen3_4b_full"]["estimate_gib"] > 0
    fair = stages["fair_floor"]
    assert fair["latent_passes"] == [1, 2, 3, 4, 5] and fair["x_floor"]["floor"] == 1.0
    assert 0 < fair["latent_share"] < 1 and 0 < fair["latent_share_per_pass"] < 1
    # The passes carry their profiler labels (which of them rank among the top 15 rows varies from run to run),
    # and the pass table has every pass with its kind.
    profile = stages["profile"]
    assert "coconut_pass_" in profile["kernel_table"]
    rows = profile["pass_table"].splitlines()[2:]
    assert [row.split(" | ")[2] for row in rows] == ["full", *["latent"] * 5, "full"], profile["pass_table"]
    # The fake-tensor figure beside the same step's real peak (on the CPU: real tensors, allocated bytes only; their
    # agreement is tests/config/test_fake_measure.py's).
    cases = stages["fake_vs_real"]["cases"]
    assert cases and all(c["fake"]["peak_gib"] > 0 and c["real"]["allocated_gib"] > 0 for c in cases)
    assert "fake" in stages["fake_vs_real"]["headline"]
    markdown = (tmp_path / "results.md").read_text()
    assert all(f"| {name} | ok |" in markdown for name in STAGES)
    assert (tmp_path / "gpu_validate.log").is_file()

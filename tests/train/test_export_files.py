"""What an export puts on disk: weights in the training dtype (checkpoint.export_dtype for another), every file with
the umask's permissions, and `best` as a link to the stage export it equals, which every reader follows."""

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from coconut_scale.atomic_files import atomic_dir
from coconut_scale.config.recipe import load_recipe
from coconut_scale.evaluate.inputs import default_out_dir, read_export_meta
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.loading import build_coconut, load_exported
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_model
from coconut_scale.train.export import export_hf, point_export
from coconut_scale.train.storage import remove_leftovers

REPO = Path(__file__).resolve().parents[2]


def _strategy():
    """What export_hf reads of a DeepSpeed strategy: the Coconut wrapper and its consolidated state dict (one
    process: the module's own state)."""
    base, tokenizer = tiny_model("llama", seed=0)
    model = build_coconut(base, tokenizer)
    return SimpleNamespace(model=model, consolidated_state_dict=lambda: dict(model.state_dict())), tokenizer


def _export(root: Path, name: str, stage: int, dtype=torch.float32) -> Path:
    strategy, tokenizer = _strategy()
    meta = ExportMeta(c_thought=1, tokens=LatentTokens.from_tokenizer(tokenizer), stage=stage, max_latent_stage=2)
    return export_hf(strategy, tokenizer, root / "hf" / name, meta, dtype=dtype)


def _dtypes(export: Path) -> set[str]:
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_the_cpu_recipes_train_and_export_in_fp32_and_the_gpu_recipes_in_bf16():
    for name in ("tiny_cpu", "demo_cpu"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.model.dtype == "fp32" and recipe.checkpoint.export_dtype is None, name
    for name in ("llama8b_gsm", "llama8b_gsm_lora", "qwen3_4b_gsm", "qwen3_4b_gsm_lora"):
        assert load_recipe(REPO / "recipes" / f"{name}.yaml").model.dtype == "bf16", name


def test_an_export_holds_its_weights_in_the_dtype_asked_for_and_says_so_in_config_json(tmp_path):
    export = _export(tmp_path, "stage0", 0, dtype=torch.bfloat16)
    assert _dtypes(export) == {"BF16"}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, meta = load_exported(export, dtype="bf16")
    assert meta.stage == 0 and next(model.parameters()).dtype == torch.bfloat16
    assert _dtypes(_export(tmp_path, "stage1", 1)) == {"F32"}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_every_file_of_an_export_has_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        export = _export(tmp_path, "stage0", 0)
    finally:
        os.umask(old)
    files = [p for p in export.rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", "coconut_config.json", "manifest.json"} <= {p.name for p in files}
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct(stat.S_IMODE(export.stat().st_mode)) == oct(0o777 & ~umask)


def test_best_is_a_link_to_its_stage_export_that_every_reader_follows(tmp_path):
    stage0 = _export(tmp_path, "stage0", 0)
    best = point_export(tmp_path / "hf" / "best", stage0)
    assert best.is_symlink() and os.readlink(best) == "stage0"  # relative: the run folder can move
    assert read_export_meta(best).stage == 0  # verified against the manifest, through the link
    model, _, meta = load_exported(best)
    assert meta.stage == 0 and sum(p.numel() for p in model.parameters()) > 0
    assert default_out_dir(best, "noise", 0) == tmp_path / "eval" / "best" / "noise-stage0"  # keeps its own name
    hf_files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert hf_files == ["best", "stage0"], hf_files  # one copy of the weights


def test_best_moves_between_a_link_and_a_real_export_without_touching_the_stage_export(tmp_path):
    stage0 = _export(tmp_path, "stage0", 0)
    weights = (stage0 / "model.safetensors").read_bytes()
    best = point_export(tmp_path / "hf" / "best", stage0)
    with atomic_dir(best) as tmp:  # a best epoch inside a stage: its own export replaces the link
        (tmp / "model.safetensors").write_bytes(b"other weights")
    assert not best.is_symlink() and (best / "model.safetensors").read_bytes() == b"other weights"
    assert (stage0 / "model.safetensors").read_bytes() == weights
    point_export(best, stage0)  # a later best that ends a stage: a link again, the real directory gone
    assert best.is_symlink() and (best / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["best", "stage0"]


def test_a_link_left_by_an_interrupted_pointer_is_removed_and_its_target_kept(tmp_path):
    stage0 = _export(tmp_path, "stage0", 0)
    os.symlink("stage0", tmp_path / "hf" / ".tmp-best-link")
    removed = remove_leftovers([tmp_path / "hf"], log=lambda line: None)
    assert [p.name for p in removed] == [".tmp-best-link"]
    assert (stage0 / "model.safetensors").is_file() and not (tmp_path / "hf" / ".tmp-best-link").is_symlink()

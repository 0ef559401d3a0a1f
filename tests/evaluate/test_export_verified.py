"""Exports carry a manifest, and every command that opens one verifies it first: a torn, truncated or rewritten file
is refused in one line naming it (eval, the analyses through the same inputs, load_exported), never a traceback;
a torn safetensors in an export without a manifest is named too."""

import json
from pathlib import Path

import pytest

from coconut_scale.cli.eval import main as eval_main
from coconut_scale.data.prosqa_synthetic import generate
from coconut_scale.data.records import write_records
from coconut_scale.errors import UserError, run_cli
from coconut_scale.file_manifest import MANIFEST, coconut_scale_version
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.loading import build_coconut, load_exported, save_exported
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base, tokenizer = tiny_model("llama", seed=0)
    meta = ExportMeta(c_thought=1, tokens=LatentTokens.from_tokenizer(tokenizer), stage=1, max_latent_stage=1)
    out = save_exported(build_coconut(base, tokenizer), tokenizer, root / "hf" / "stage1", meta)
    data = root / "data.json"
    write_records(generate(4, seed=5, n_concepts=5, min_depth=1, max_depth=2, extra_edges=0.3), data)
    return out, data


def _copy(export_dir: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(export_dir, to / export_dir.name))


def test_an_export_lists_every_file_with_the_version(export):
    out, _ = export
    manifest = json.loads((out / MANIFEST).read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    assert manifest["coconut_scale"] == coconut_scale_version()
    load_exported(out)  # verifies and loads


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "bytes, its manifest says"),
    (lambda p: p.write_bytes(b"\0" * len(p.read_bytes())), "does not match the xxh3_128-256MiB digest"),
])
def test_a_damaged_export_is_refused_in_one_line_by_eval_and_load_exported(export, tmp_path, capsys, damage, says):
    out, data = export
    copy = _copy(out, tmp_path)
    damage(copy / "model.safetensors")
    assert run_cli(eval_main, [str(copy), str(data), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(err[-1])
    assert len(err) == 1 and err[0].startswith("error: export ") and str(copy / "model.safetensors") in err[0]
    assert says in err[0] and "Traceback" not in err[0]
    with pytest.raises(UserError, match="model.safetensors"):
        load_exported(copy)


def test_a_torn_safetensors_without_a_manifest_is_named_not_a_traceback(export, tmp_path, capsys):
    out, data = export
    copy = _copy(out, tmp_path)
    (copy / MANIFEST).unlink()
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert run_cli(eval_main, [str(copy), str(data), "--out", str(tmp_path / "eval")]) == 2
    lines = capsys.readouterr()
    err = lines.err.strip().splitlines()
    print(lines.out.strip(), err[-1], sep="\n")
    assert "has no manifest.json" in lines.out
    assert len(err) == 1 and str(weights) in err[0] and "cannot be read" in err[0]


@pytest.mark.parametrize("tool", ["noise_sweep", "ablations", "probing"])
def test_every_analysis_refuses_a_damaged_export_in_one_line(export, tmp_path, capsys, tool):
    """decode_latents opens exports through the same load_inputs (after checking they hold a step decoder)."""
    import importlib

    out, data = export
    copy = _copy(out, tmp_path)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    main = importlib.import_module(f"coconut_scale.evaluate.{tool}").main
    assert run_cli(main, [str(copy), str(data), "--out", str(tmp_path / tool)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{weights} has " in err[0] and "its manifest says" in err[0], err

"""Checkpoints and exports record the coconut_scale version that wrote them; a key this version does not know, in a
checkpoint from a newer version, is refused saying so and naming both versions (not with advice to allow a key
that does not exist here)."""

import json
from pathlib import Path

import pytest
import yaml

from coconut_scale.config.recipe import load_recipe
from coconut_scale.file_manifest import MANIFEST, coconut_scale_version
from coconut_scale.train.recipe_guard import RecipeChangeError, check_resume
from coconut_scale.train.versions import NewerVersionError, is_newer, refuse_unknown

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"


def _checkpoint(tmp_path, version):
    ckpt = tmp_path / "step-00000010"
    ckpt.mkdir()
    saved = load_recipe(RECIPE).resolved_dict()
    saved["optim"]["future_knob"] = 3  # a key a later version added
    (ckpt / "recipe.resolved.yaml").write_text(yaml.safe_dump(saved))
    (ckpt / MANIFEST).write_text(json.dumps({"format": 2, "digest": "xxh3_128", "coconut_scale": version,
                                             "files": {}}))
    return ckpt


def test_a_key_from_a_newer_version_is_refused_naming_both_versions(tmp_path):
    ckpt = _checkpoint(tmp_path, "9.0.0")
    with pytest.raises(NewerVersionError) as caught:
        check_resume(load_recipe(RECIPE), ckpt)
    message = str(caught.value)
    print(message)
    assert message == (f"checkpoint {ckpt} was written by coconut_scale 9.0.0, newer than this coconut_scale "
                       f"{coconut_scale_version()}: its recipe has key optim.future_knob, which this version does not "
                       f"know. Resume it with coconut_scale 9.0.0 or newer")
    assert "allow_changes" not in message


def test_an_unknown_key_from_this_or_an_older_version_is_still_a_listed_change(tmp_path):
    ckpt = _checkpoint(tmp_path, coconut_scale_version())
    with pytest.raises(RecipeChangeError, match=r'optim\.future_knob: 3 -> "\(absent\)"'):
        check_resume(load_recipe(RECIPE), ckpt)


def test_loop_state_keys_of_a_newer_version_are_refused_too(tmp_path):
    ckpt = _checkpoint(tmp_path, "0.99.0" if is_newer("0.99.0", coconut_scale_version()) else "99.0")
    with pytest.raises(NewerVersionError, match=r"its loop state has key future_counter"):
        refuse_unknown(ckpt, "loop state", ["key future_counter"])
    refuse_unknown(ckpt, "loop state", [])  # nothing unknown: nothing to refuse


def test_versions_compare_as_versions():
    assert is_newer("0.10.0", "0.9.1") and not is_newer("0.1.0", "0.1.0") and not is_newer(None, "0.1.0")

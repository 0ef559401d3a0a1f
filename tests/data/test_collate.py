"""The latent-aligned training collator and left padding for generation."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coconut_scale.data.collate import LatentAlignedCollator, left_pad_for_generation
from coconut_scale.data.curriculum import CurriculumConfig, build_stage_dataset
from coconut_scale.model.coconut import latent_columns
from coconut_scale.model.tokens import LatentTokens

T = LatentTokens(start_id=1, latent_id=2, end_id=3, eos_id=0, pad_id=0)
P = T.pad_id
X = -100


def row(q_len, n_latents, tail_len, base=10):
    q = list(range(base, base + q_len))
    tail = list(range(base + 50, base + 50 + tail_len))
    if n_latents:
        ids = q + [T.start_id] + [T.latent_id] * n_latents + [T.end_id] + tail
        labels = [X] * (q_len + n_latents + 2) + tail
    else:
        ids, labels = q + tail, [X] * q_len + tail
    return {"input_ids": ids, "labels": labels}


def test_official_picture():
    # xxxxxxxxxx<latent><latent>xxxxx--
    # -----xxxxx<latent>xxxxxxxx-------
    # ---xxxxxxx<latent><latent>xxxxxxx     (and a row without latents, not shifted)
    rows = [row(9, 2, 4), row(4, 1, 7), row(6, 2, 6), row(3, 0, 2)]
    b = LatentAlignedCollator(pad_id=P, latent_id=T.latent_id)(rows)
    first = [r.tolist().index(T.latent_id) for r in b["input_ids"][:3]]
    assert first == [10, 10, 10]
    assert b["input_ids"].shape == (4, 10 + 2 + 1 + 6)
    assert b["attention_mask"].tolist() == [
        [1] * 17 + [0] * 2,
        [0] * 5 + [1] * 14,
        [0] * 3 + [1] * 16,
        [1] * 5 + [0] * 14,
    ]
    assert b["position_ids"][1].tolist() == [0] * 5 + list(range(14))
    assert b["position_ids"][3].tolist() == list(range(5)) + [0] * 14
    assert b["labels"][1].tolist() == [X] * 5 + rows[1]["labels"]
    assert b["input_ids"][1].tolist() == [P] * 5 + rows[1]["input_ids"]
    assert b["labels"][0].tolist() == rows[0]["labels"] + [X] * 2
    assert set(b) == {"input_ids", "attention_mask", "position_ids", "labels"}
    assert all(t.dtype == torch.long for t in b.values())


def test_no_latents_is_plain_right_padding_and_no_labels_ok():
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    b = LatentAlignedCollator(pad_id=P, latent_id=T.latent_id)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, P, P]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert "labels" not in b


def test_keep_keys_and_real_examples():
    c = CurriculumConfig(mode="coconut", c_thought=2, max_latent_stage=3, uniform_prob=0.5)
    recs = [{"idx": i, "question_ids": list(range(10, 10 + i)), "steps_ids": [[20] * (i % 3)] * (i % 4),
             "answer_ids": [30, 0]} for i in range(1, 9)]
    ds = build_stage_dataset(recs, 1, c, T, seed=0)
    coll = LatentAlignedCollator(pad_id=P, latent_id=T.latent_id, keep_keys=("idx", "n_latents"))
    b = coll(list(ds))
    assert b["idx"].tolist() == list(range(1, 9))
    assert b["n_latents"].tolist() == [ex["n_latents"] for ex in ds]
    cols = {r.tolist().index(T.latent_id) for r, n in zip(b["input_ids"], b["n_latents"]) if n > 0}
    assert len(cols) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 5), st.integers(0, 8)), min_size=1, max_size=8))
def test_property_alignment(specs):
    rows = [row(q, n, t) for q, n, t in specs]
    b = LatentAlignedCollator(pad_id=P, latent_id=T.latent_id)(rows)
    ids, mask, pos, labels = b["input_ids"], b["attention_mask"], b["position_ids"], b["labels"]
    with_latents = [q + 1 for q, n, _ in specs if n]
    align = max(with_latents) if with_latents else None
    assert ids.shape[1] == max((align - (q + 1) if n else 0) + len(r["input_ids"]) for (q, n, _), r in zip(specs, rows))
    for i, ((q, n, t), r) in enumerate(zip(specs, rows)):
        length = len(r["input_ids"])
        real = mask[i].nonzero().flatten().tolist()
        start = real[0]
        assert real == list(range(start, start + length))  # one contiguous block
        assert start == (align - (q + 1) if n else 0)  # first latent aligned; latent-free rows unshifted
        if n:
            assert ids[i].tolist().index(T.latent_id) == align
        assert ids[i, start:start + length].tolist() == r["input_ids"]
        assert labels[i, start:start + length].tolist() == r["labels"]
        assert pos[i, start:start + length].tolist() == list(range(length))
        pad = mask[i] == 0
        assert (ids[i][pad] == P).all() and (labels[i][pad] == X).all() and (pos[i][pad] == 0).all()
    # on real tokens this is the usual cumsum formula (which differs only on right padding, masked anyway)
    assert torch.equal(pos[mask == 1], ((mask.cumsum(-1) - 1).clamp_min(0))[mask == 1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 5), st.integers(0, 8)), min_size=1, max_size=8))
def test_latent_columns_from_features_equal_the_collated_batch(specs):
    """The pass plan's input, known on the host from the features alone, is what the batch holds."""
    rows = [row(q, n, t) for q, n, t in specs]
    collate = LatentAlignedCollator(pad_id=P, latent_id=T.latent_id)
    ids = collate(rows)["input_ids"]
    assert collate.latent_columns(rows) == latent_columns(ids, T.latent_id)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(5, 99), min_size=1, max_size=10), min_size=1, max_size=6))
def test_left_pad_for_generation(rows):
    ids, mask, pos = left_pad_for_generation(rows, pad_id=P)
    width = max(len(r) for r in rows)
    assert ids.shape == mask.shape == pos.shape == (len(rows), width)
    for i, r in enumerate(rows):
        pad = width - len(r)
        assert ids[i].tolist() == [P] * pad + r
        assert mask[i].tolist() == [0] * pad + [1] * len(r)
        assert pos[i].tolist() == [0] * pad + list(range(len(r)))

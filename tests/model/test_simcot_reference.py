"""The per-row SIM-CoT step loss (simcot_reference.py) pinned to InternLM/SIM-CoT CODI/src/model.py: step
extraction on hand-built ids, the dedup_trailing_pads bug, and equality with a batched transcription of their
loss, with and without the bug, on tiny GPT-2 and Llama."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from codi_reference import CodiSettings, codi_losses, codi_projection
from codi_released_port import released_step_loss
from simcot_reference import dedup_trailing_pads, get_steps, pad_steps, step_decoder_loss, step_ids_per_row
from coconut_scale.data.codi_data import CodiCollator, CodiDataOptions, CodiTokenIds, build_codi_rows
from coconut_scale.testing import tiny_config, tiny_tokenizer

PAD, EOS, START, SPACE_START, END = 0, 1, 10, 11, 12  # hand-built ids
NUM_LATENT = 2
RECORDS = [  # step lengths differ between rows, and row 0's is the shortest: the bug shows
    {"question": "Janet had 3 apples.", "steps": ["<<3+4=7>>", "<<7*2=14>>"], "answer": "14"},
    {"question": "Q: 12 + 30 = ?", "steps": ["<<12+30*2/4=42>>", "<<42*1=42>>"], "answer": "42"},
    {"question": "Tom is a wumpus. Is Tom a yumpus?", "steps": ["<<1+1=2>>", "<<2+5=7>>", "<<7*2=14>>"],
     "answer": "7"},
]


def _steps(rows, num_steps=3):
    return get_steps(rows, num_steps, start_ids=(START, SPACE_START), end_id=END, step_end_id=EOS, pad_id=PAD,
                     stop_ids=(EOS, PAD))


def test_steps_are_the_spans_between_start_and_end_ids_with_eos():
    assert _steps([[5, START, 7, END, SPACE_START, 8, 9, END, 6, EOS, PAD]]) == \
        [[[START, 7, END, EOS], [SPACE_START, 8, 9, END, EOS], [PAD]]]


def test_steps_beyond_the_count_are_merged_into_the_last_one():
    row = [START, 2, END, SPACE_START, 3, END, SPACE_START, 4, END, SPACE_START, 5, END, EOS]
    assert _steps([row]) == [[[START, 2, END, EOS], [SPACE_START, 3, END, EOS],
                              [SPACE_START, 4, END, SPACE_START, 5, END, EOS]]]


def test_steps_stop_at_the_first_stop_id_and_need_their_end():
    # The span opened by START ends only after EOS: no step. Nothing after the first stop id is read.
    assert _steps([[START, 7, EOS, SPACE_START, 8, END]]) == [[[PAD], [PAD], [PAD]]]
    assert _steps([[START, 7, PAD, START, 8, END, EOS]]) == [[[PAD], [PAD], [PAD]]]


def test_dedup_trailing_pads_cuts_every_row_to_row_zero_and_empties_rows_after_a_pad_step():
    padded = pad_steps([[[5, 6, EOS]], [[7, 8, 9, 4, EOS]]], PAD)
    assert padded == [[[5, 6, EOS, PAD, PAD]], [[7, 8, 9, 4, EOS]]]
    assert dedup_trailing_pads([padded[0][0]], PAD) == [[5, 6, EOS, PAD]]
    assert step_ids_per_row(padded, 0, PAD, dedup_bug=True) == [[5, 6, EOS], [7, 8, 9, 4]]
    assert step_ids_per_row(padded, 0, PAD, dedup_bug=False) == [[5, 6, EOS], [7, 8, 9, 4, EOS]]
    padded = pad_steps([[[PAD]], [[7, 8, 9, 4, EOS]]], PAD)
    assert step_ids_per_row(padded, 0, PAD, dedup_bug=True) == [[], [7]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    tokenizer = tiny_tokenizer(with_latent_tokens=False)
    vocab = len(tokenizer)
    ids = CodiTokenIds(pad_id=vocab, bot_id=vocab + 1, eot_id=vocab + 2, eos_id=tokenizer.eos_token_id)
    rows, _ = build_codi_rows(RECORDS, tokenizer, ids, CodiDataOptions(lone_space_rule="token"))
    batch = CodiCollator(ids.pad_id)(rows)
    config = tiny_config(request.param, vocab_size=vocab + 3, eos_id=ids.eos_id, pad_token_id=None)
    torch.manual_seed(0)
    codi = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    decoder = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    prj = codi_projection(config.hidden_size, 48)
    start_ids = tuple(tokenizer.convert_tokens_to_ids(["<<", "Ġ<<"]))
    end_id = tokenizer.convert_tokens_to_ids(">>")
    steps = get_steps(batch["teacher_input_ids"].tolist(), NUM_LATENT + 1, start_ids, end_id, ids.eos_id, ids.pad_id,
                      (ids.eos_id, ids.pad_id))
    return {"codi": codi, "decoder": decoder, "prj": prj, "batch": batch, "ids": ids,
            "padded": pad_steps(steps, ids.pad_id), "steps": steps, "space_start": start_ids[1]}


def test_the_steps_of_the_teacher_cot_skip_its_dropped_last_step(setup):
    counts = [sum(step != [setup["ids"].pad_id] for step in row) for row in setup["steps"]]
    assert counts == [len(r["steps"]) - 1 for r in RECORDS]


@pytest.mark.parametrize("dedup_bug", [True, False])
def test_per_row_step_loss_equals_the_released_batched_loss(setup, dedup_bug):
    losses = codi_losses(setup["codi"], setup["prj"], setup["batch"], CodiSettings(num_latent=NUM_LATENT))
    embedding = setup["codi"].get_input_embeddings()
    explain, step_ces = step_decoder_loss(setup["decoder"], embedding, losses.latents, setup["padded"],
                                          setup["ids"].pad_id, dedup_bug=dedup_bug)
    by_step = [torch.cat([row[k] for row in losses.latents]) for k in range(NUM_LATENT + 1)]
    theirs, counted = released_step_loss(setup["decoder"], embedding, by_step, setup["padded"], setup["ids"].pad_id,
                                         dedup_inside_loop=dedup_bug)
    torch.testing.assert_close(explain, theirs, rtol=1e-5, atol=1e-6)
    assert counted == sum(ce is not None for ce in step_ces) == 2  # step 2 is [pad] in every row: skipped
    explain.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in setup["prj"].parameters())
    assert setup["decoder"].get_output_embeddings().weight.grad.abs().sum() > 0
    setup["decoder"].zero_grad(), setup["prj"].zero_grad(), setup["codi"].zero_grad()


def test_the_bug_changes_the_loss_and_keeps_one_token_after_a_pad_step(setup):
    pad = setup["ids"].pad_id
    assert step_ids_per_row(setup["padded"], 1, pad, dedup_bug=True) == [[], [], [setup["space_start"]]]
    with torch.no_grad():
        latents = codi_losses(setup["codi"], setup["prj"], setup["batch"], CodiSettings(num_latent=NUM_LATENT)).latents
        embedding = setup["codi"].get_input_embeddings()
        buggy = step_decoder_loss(setup["decoder"], embedding, latents, setup["padded"], pad, dedup_bug=True)
        intended = step_decoder_loss(setup["decoder"], embedding, latents, setup["padded"], pad, dedup_bug=False)
    assert abs(float(buggy[0]) - float(intended[0])) > 1e-3
    factor = step_decoder_loss(setup["decoder"], embedding, latents, setup["padded"], pad, dedup_bug=False,
                               explain_loss_factor=3.0)[0]
    torch.testing.assert_close(factor, 3.0 * intended[0])

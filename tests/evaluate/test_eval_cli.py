"""python -m coconut_scale.eval on a tiny exported model (tiny_export.py): numbers checked against a hand
computation from the naive reference's generations. One 2-rank torchrun run checks sharding with uneven shards.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_process import subprocess_env
from png_check import assert_png
from tiny_export import MAX_NEW, N_PLANTED, N_RECORDS, STAGE, curriculum, expected_scores, reference_rows

from coconut_scale import distributed as dist
from coconut_scale.cli.eval import main as eval_main
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.curriculum import build_eval_examples, build_stage_dataset
from coconut_scale.data.tokenized import tokenize_records
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.generation import validation_loss
from coconut_scale.model.loading import build_coconut
from coconut_scale.model.tokens import LatentTokens

REPO = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_the_fixture_is_not_degenerate(tiny):
    scores = expected_scores(tiny.records, tiny.refs, STAGE)
    assert 0 < sum(s["correct"] for s in scores) < N_RECORDS
    assert any(s["cot_match"] for s in scores)
    assert len({s["n_new_tokens"] for s in scores}) > 1, "every generation has the same length"
    assert {s["n_latents"] for s in scores} == {1, 2}, "expected both 1-step and longer records"


@pytest.mark.parametrize("stage", [None, 1, 0])
def test_eval_matches_hand_computation(tiny, tmp_path, stage):
    out = tmp_path / "out"
    argv = [str(tiny.export), str(tiny.data), "--batch-size", "3", "--max-new-tokens", str(MAX_NEW), "--out", str(out)]
    if stage is not None:
        argv += ["--stage", str(stage)]
    assert run_cli(eval_main, argv) == 0
    stage = STAGE if stage is None else stage
    refs = tiny.refs if stage == STAGE else reference_rows(tiny.base, tiny.tokenizer, tiny.records, stage)
    want = expected_scores(tiny.records, refs, stage)
    report = json.loads((out / "report.json").read_text())
    n = len(want)
    assert report["stage"] == stage and report["n_examples"] == n and report["world_size"] == 1
    assert report["accuracy"] == pytest.approx(sum(w["correct"] for w in want) / n)
    assert report["cot_exact_match"] == pytest.approx(sum(w["cot_match"] for w in want) / n)
    assert report["mean_new_tokens"] == pytest.approx(sum(w["n_new_tokens"] for w in want) / n)
    assert report["mean_latents"] == pytest.approx(sum(w["n_latents"] for w in want) / n)
    assert report["mean_tokens"] == pytest.approx(sum(w["n_new_tokens"] + w["n_latents"] for w in want) / n)
    assert report["n_truncated"] == sum(tiny.tokenizer.eos_token_id not in r["ids"] for r in refs)
    assert report["examples_per_s"] > 0
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["idx"] for s in samples] == list(range(n))
    assert [s["generated"] for s in samples] == [r["text"] for r in refs]
    assert [s["n_new_tokens"] for s in samples] == [w["n_new_tokens"] for w in want]
    assert [s["correct"] for s in samples] == [w["correct"] for w in want]
    assert_png(out / "tokens.png")
    if stage == STAGE:
        assert report["accuracy"] == pytest.approx(N_PLANTED / n)  # planted answers, and no others, match


@pytest.mark.slow  # two ranks under torchrun
def test_two_ranks_with_uneven_shards_match_one(tiny, tmp_path):
    # 7 examples over 2 ranks at batch size 1: shards of 4 and 3, so rank 1 runs a filler batch at the end.
    common = [str(tiny.export), str(tiny.data), "--batch-size", "1", "--max-new-tokens", str(MAX_NEW),
              "--max-examples", "7"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "coconut_scale.eval", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert run_cli(eval_main, [*common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["world_size"] == 2 and two["n_examples"] == 7
    want = expected_scores(tiny.records[:7], tiny.refs[:7], STAGE)
    for key in ("accuracy", "cot_exact_match", "mean_new_tokens", "mean_latents", "mean_tokens"):
        assert two[key] == pytest.approx(one[key]), key
    assert two["accuracy"] == pytest.approx(sum(w["correct"] for w in want) / 7)
    assert two["mean_new_tokens"] == pytest.approx(sum(w["n_new_tokens"] for w in want) / 7)
    assert read_jsonl(tmp_path / "two" / "samples.jsonl") == read_jsonl(tmp_path / "one" / "samples.jsonl")
    assert "accuracy" in proc.stdout and proc.stdout.count("accuracy") == 1, "only rank 0 prints the summary"


def _fails(argv: list[str], capsys) -> str:
    assert run_cli(eval_main, argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_fail_with_a_clear_message(tiny, tmp_path, capsys):
    data, export = str(tiny.data), str(tiny.export)
    missing = tmp_path / "no_such_export"
    assert f"checkpoint directory {missing} does not exist" in _fails([str(missing), data], capsys)

    not_export = tmp_path / "plain_dir"
    not_export.mkdir()
    assert "coconut_config.json not found" in _fails([str(not_export), data], capsys)

    err = _fails([export, data, "--stage", "3"], capsys)
    assert "--stage 3" in err and "max_latent_stage=2" in err and "coconut_config.json" in err

    bad = json.loads(Path(data).read_text())
    bad[4]["steps"] = ["Tom is a wumpus.", 7]
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad))
    err = _fails([export, str(bad_file)], capsys)
    assert str(bad_file) in err and "record 4" in err and "steps[1]" in err

    err = _fails([export, str(tmp_path / "nope.json")], capsys)
    assert "nope.json" in err and "cannot read file" in err

    broken = tmp_path / "broken_export"
    broken.mkdir()
    (broken / "coconut_config.json").write_text('{"c_thought": 1, "latent_id": "x"}')
    err = _fails([str(broken), data], capsys)
    assert "coconut_config.json" in err and "'latent_id'" in err

    assert "--batch-size must be >= 1" in _fails([export, data, "--batch-size", "0"], capsys)


def _token_weighted_loss(coconut, examples, collate) -> float:
    """One example at a time: sum of per-token cross-entropies over all examples / their supervised tokens."""
    total, count = 0.0, 0
    for ex in examples:
        batch = collate([ex])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(coconut(**batch).loss) * n
        count += n
    return total / count


@torch.no_grad()
def test_validation_loss_shards_and_fillers_count_zero_tokens(tiny, monkeypatch):
    coconut = build_coconut(tiny.base, tiny.tokenizer).eval()
    tokens = LatentTokens.from_tokenizer(tiny.tokenizer)
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    examples = build_stage_dataset(tokenize_records(tiny.records, tiny.tokenizer)[:7], STAGE, curriculum(), tokens)
    want = _token_weighted_loss(coconut, examples, collate)
    assert validation_loss(coconut, examples, 3, collate, "cpu") == pytest.approx(want, rel=1e-5)

    # Rank 1 of 2, batch 1: its shard (examples 1, 3, 5) is one batch short of rank 0's, so it runs a filler
    # forward of example 0 whose tokens must not count. (all_reduce_sum is the identity here: rank 1's sums.)
    calls = []
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_max", lambda value: max(value, 4))  # rank 0 has 4 batches
    loss = validation_loss(coconut, examples, 1, collate, "cpu",
                           num_passes_fn=lambda ids: calls.append(ids[0].tolist()) or None)
    assert len(calls) == 4 and calls[-1] == collate([examples[0]])["input_ids"][0].tolist()
    assert loss == pytest.approx(_token_weighted_loss(coconut, [examples[i] for i in (1, 3, 5)], collate), rel=1e-5)


@torch.no_grad()
def test_evaluation_plans_its_passes_from_the_host_copy(tiny, monkeypatch):
    """Generation and the validation loss hand the model its latent columns (from the CPU batch or the features),
    so the model never reads them back from the device: the model's own reader is made to fail here."""
    import coconut_scale.model.coconut as coconut_module
    from coconut_scale.evaluate.generation import generate_and_score

    coconut = build_coconut(tiny.base, tiny.tokenizer).eval()
    tokens = LatentTokens.from_tokenizer(tiny.tokenizer)
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    tokenized = tokenize_records(tiny.records, tiny.tokenizer)[:4]
    examples = build_stage_dataset(tokenized, STAGE, curriculum(), tokens)
    prompts = build_eval_examples(tokenized, STAGE, curriculum(), tokens)
    assert any(ex["n_latents"] for ex in prompts)
    want_loss = validation_loss(coconut, examples, 2, collate, "cpu")
    want = generate_and_score(coconut, prompts, tiny.tokenizer, 2, 6, "cpu")["rows"]

    def refuse(*args, **kwargs):
        raise AssertionError("the model read the latent columns back from the batch")

    monkeypatch.setattr(coconut_module, "latent_columns", refuse)
    assert validation_loss(coconut, examples, 2, collate, "cpu") == pytest.approx(want_loss)
    assert generate_and_score(coconut, prompts, tiny.tokenizer, 2, 6, "cpu")["rows"] == want

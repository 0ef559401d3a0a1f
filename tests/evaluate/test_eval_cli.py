"""python -m coconut_scale.eval on a tiny exported model: numbers checked against a hand computation.

The expected outputs come from the naive reference (coconut_scale.model.reference: batch of one, no KV cache, latents
filled one at a time by recomputing the whole sequence), not from the batched, cached generate() the CLI
uses. Some gold answers (and one gold CoT step) in the data file are planted from those reference outputs, so
the accuracy is a known fraction strictly between 0 and 1, and the token counts are counted from the
reference ids. One 2-rank torchrun run checks sharding with uneven shards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
from conftest import REPO

from coconut_scale.errors import run_cli
from coconut_scale.data.curriculum import CurriculumConfig, build_eval_examples, build_stage_dataset
from coconut_scale.data.prosqa_synthetic import generate
from coconut_scale.cli.eval import main as eval_main
from coconut_scale import distributed as dist
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.evaluate.generation import extract_answer, extract_cot, validation_loss
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.loading import build_coconut, save_exported
from coconut_scale.data.records import write_records
from coconut_scale.model.reference import reference_generate
from coconut_scale.testing import tiny_model
from coconut_scale.data.tokenized import tokenize_records
from coconut_scale.model.tokens import LatentTokens

MAX_NEW = 12
N_RECORDS = 8
STAGE = 2  # the export's stage and max_latent_stage; pad_latent_to_max is off, so 1-step records get 1 latent
N_PLANTED = 4  # records whose gold answer is set to what the model generates at STAGE


def assert_png(path: Path) -> None:
    """A real, decodable, non-blank PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"


def curriculum() -> CurriculumConfig:
    return CurriculumConfig(mode="coconut", c_thought=1, max_latent_stage=STAGE, pad_latent_to_max=False)


def reference_rows(base, tokenizer, records: list[dict], stage: int, max_new: int = MAX_NEW) -> list[dict]:
    """Per example: prompt latents, the generated ids (up to and including EOS) and their text, by the naive path."""
    tokens = LatentTokens.from_tokenizer(tokenizer)
    rows = []
    for ex in build_eval_examples(tokenize_records(records, tokenizer), stage, curriculum(), tokens):
        ids = torch.tensor([ex["input_ids"]])
        new = reference_generate(base, ids, tokens.latent_id, tokens.eos_id, max_new)[0, ids.shape[1]:].tolist()
        rows.append({"n_latents": ex["input_ids"].count(tokens.latent_id), "ids": new,
                     "text": tokenizer.decode(new, skip_special_tokens=True)})
    return rows


def expected_scores(records: list[dict], refs: list[dict], stage: int) -> list[dict]:
    """Scoring by hand: the answer after the last '#', the CoT before the first '#', gold steps after the stage's."""
    out = []
    for rec, ref in zip(records, refs):
        skip = min(stage, len(rec["steps"]))
        gold_cot = "\n".join(s.strip() for s in rec["steps"][skip:]).strip()
        out.append({"correct": extract_answer(ref["text"]) == rec["answer"].replace(",", "").strip(),
                    "cot_match": extract_cot(ref["text"]) == gold_cot,
                    "n_new_tokens": len(ref["ids"]), "n_latents": ref["n_latents"]})
    return out


def build_tiny_export(root: Path) -> SimpleNamespace:
    """A tiny random Llama exported at stage 2, and a ProsQA-style file whose planted answers it gets right."""
    base, tokenizer = tiny_model("llama", seed=0)
    with torch.no_grad():
        # Untie the three new token rows (exact logit ties make greedy argmax depend on rounding).
        emb = base.get_input_embeddings().weight
        emb.add_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        # At init scale (std 0.02) attention is near uniform and one latent barely moves the output; larger
        # layer weights make the continuous thoughts matter, so feedback on/off and noise change answers.
        for name, weight in base.model.layers.named_parameters():
            if name.endswith("proj.weight"):
                weight.mul_(8.0)
        # An EOS row along a random direction: EOS wins on some states only, so generations stop at varied lengths.
        direction = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(2))
        base.lm_head.weight[tokenizer.eos_token_id] = 0.2 * direction / direction.norm()
    base.eval()
    meta = ExportMeta(c_thought=1, tokens=LatentTokens.from_tokenizer(tokenizer), stage=STAGE, max_latent_stage=STAGE)
    export = save_exported(build_coconut(base, tokenizer), tokenizer, root / "hf" / "stage2", meta)
    records = generate(N_RECORDS, seed=5, n_concepts=5, min_depth=1, max_depth=3, extra_edges=0.3)
    refs = reference_rows(base, tokenizer, records, STAGE)
    # The first records whose generated answer is non-empty (a record needs an answer) get it as their gold.
    planted = [i for i, ref in enumerate(refs) if extract_answer(ref["text"])][:N_PLANTED]
    assert len(planted) == N_PLANTED
    for i in planted:
        records[i]["answer"] = extract_answer(refs[i]["text"])
        if len(records[i]["steps"]) > STAGE:  # the step the stage still writes out: plant the generated CoT
            records[i]["steps"][STAGE] = extract_cot(refs[i]["text"])
    data = root / "prosqa_tiny.json"
    write_records(records, data)
    return SimpleNamespace(export=export, data=data, records=records, base=base, tokenizer=tokenizer, refs=refs,
                           planted=planted)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("tiny_run"))


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


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_two_ranks_with_uneven_shards_match_one(tiny, tmp_path):
    # 7 examples over 2 ranks at batch size 1: shards of 4 and 3, so rank 1 runs a filler batch at the end.
    common = [str(tiny.export), str(tiny.data), "--batch-size", "1", "--max-new-tokens", str(MAX_NEW),
              "--max-examples", "7"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "coconut_scale.eval", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
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

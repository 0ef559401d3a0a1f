"""The analysis CLIs on a tiny exported model, each number recomputed by hand with plain HF forwards.

- noise_sweep: the measured noise statistics against each kind's definition (and the fed states against the
  naive reference), and per-cell accuracy against a naive generation that perturbs the states itself;
- ablations: loss and answer perplexity from a plain HF forward (latents filled by the naive reference, or
  left as token embeddings), accuracy from naive generation;
- probing: top-k tokens and graph masses from lm_head applied to the reference's fed states;
- curves: a metrics.jsonl written here (a resumed run's duplicate lines included).
Every PNG must decode to a non-blank image.
"""

import json
import math

import pytest
import torch

from png_check import assert_png
from tiny_export import MAX_NEW, STAGE, curriculum, expected_scores

from coconut_scale.evaluate import ablations, curves, noise_sweep, probing
from coconut_scale.data.curriculum import build_eval_examples
from coconut_scale.errors import run_cli
from coconut_scale.model.coconut import example_keys
from coconut_scale.model.perturb import Perturbation
from coconut_scale.model.reference import reference_filled_embeddings, reference_generate
from coconut_scale.data.tokenized import tokenize_records
from coconut_scale.model.tokens import LatentTokens


def _examples(tiny, stage=STAGE):
    tokens = LatentTokens.from_tokenizer(tiny.tokenizer)
    return build_eval_examples(tokenize_records(tiny.records, tiny.tokenizer), stage, curriculum(), tokens), tokens


def _filled(base, ids: list[int], latent_id: int) -> torch.Tensor:
    t = torch.tensor([ids])
    mask = torch.ones_like(t)
    return reference_filled_embeddings(base, t, mask, torch.arange(t.shape[1])[None], latent_id)


# -- noise sweep ---------------------------------------------------------------------------------------------

SCALES = {"gaussian": 0.5, "gaussian_scaled": 0.3, "snr": 5.0, "uniform": 0.4, "orthogonal": 0.5, "targeted": -0.4}


@torch.no_grad()
def test_noise_statistics_match_each_kind(tiny, tmp_path):
    # Every example draws its own noise (keyed by its tokens), 8 examples in one batch. Tolerances are 4 standard deviations
    # of the mean over the 8 first-latent states (d = 64): |noise| of a gaussian row varies by 1/sqrt(2d) = 8.8%
    # (mean of 8: 3.1%), its SNR by 0.77 dB (0.27 dB), a uniform row's rms by 5.6% (2%).
    out = tmp_path / "noise"
    argv = [str(tiny.export), str(tiny.data), "--batch-size", "8", "--max-new-tokens", str(MAX_NEW), "--out", str(out),
            "--passes", "all", "0", "--scales", *[f"{k}={v}" for k, v in SCALES.items()]]
    assert run_cli(noise_sweep.main, argv) == 0
    report = json.loads((out / "noise_sweep.json").read_text())
    assert_png(out / "noise_sweep.png")
    want = expected_scores(tiny.records, tiny.refs, STAGE)
    assert report["clean"]["accuracy"] == pytest.approx(sum(w["correct"] for w in want) / len(want))
    cells = {(c["kind"], c["passes"]): c for c in report["cells"]}
    assert len(cells) == 12 and {c["scale"] for c in report["cells"]} == set(SCALES.values())

    examples, tokens = _examples(tiny)
    n_latents = sum(ex["n_latents"] for ex in examples)
    # Norms of the first fed-back state of each example, by the naive reference (nothing perturbed before it).
    first_norms = []
    for ex in examples:
        pos = ex["input_ids"].index(tokens.latent_id)
        first_norms.append(float(_filled(tiny.base, ex["input_ids"], tokens.latent_id)[0, pos].norm()))
    d = tiny.base.config.hidden_size
    for kind, scale in SCALES.items():
        everything, first = cells[(kind, "all")]["noise"], cells[(kind, "0")]["noise"]
        assert everything["n_states"] == n_latents and first["n_states"] == len(examples)
        assert first["mean_state_norm"] == pytest.approx(sum(first_norms) / len(first_norms), rel=1e-4)
        for stats in (everything, first):
            if kind == "gaussian":  # absolute sigma: rms noise per coordinate ~ sigma
                assert stats["mean_noise_rms"] == pytest.approx(scale, rel=0.125)
            elif kind == "gaussian_scaled":  # |noise| ~ scale |h|
                assert stats["mean_rel_norm"] == pytest.approx(scale, rel=0.125)
            elif kind == "snr":  # mean(h^2) / mean(noise^2) = 10^(dB/10)
                assert stats["mean_snr_db"] == pytest.approx(scale, abs=1.1)
            elif kind == "uniform":  # U(-a, a): rms a / sqrt(3), never beyond a
                assert stats["mean_noise_rms"] == pytest.approx(scale / math.sqrt(3), rel=0.08)
                assert stats["max_abs_coord"] <= scale + 1e-6
            elif kind == "orthogonal":  # perpendicular to h, norm exactly scale |h|
                assert stats["max_abs_cos"] < 1e-4
                assert stats["mean_rel_norm"] == pytest.approx(scale, rel=1e-4)
            else:  # targeted: scale * h, against h for a negative scale
                assert stats["mean_cos"] == pytest.approx(-1.0, abs=1e-5)
                assert stats["mean_rel_norm"] == pytest.approx(abs(scale), rel=1e-4)
        assert everything["mean_noise_rms"] * math.sqrt(d) == pytest.approx(everything["mean_noise_norm"], rel=1e-5)


def _perturbed_generate(base, ids: list[int], tokens, perturbation: Perturbation, max_new: int) -> list[int]:
    """Naive: fill each latent with the (perturbed) state before it, recomputing everything; greedy decoding."""
    embed = base.get_input_embeddings()
    embeds = embed(torch.tensor([ids]))
    for k, pos in enumerate(i for i, t in enumerate(ids) if t == tokens.latent_id):
        hidden = base(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0, pos - 1]
        embeds = embeds.clone()
        key = example_keys(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        embeds[0, pos] = perturbation(hidden[None], k, row_keys=key)[0]
    new = []
    for _ in range(max_new):
        token = int(base(inputs_embeds=embeds).logits[0, -1].argmax())
        new.append(token)
        if token == tokens.eos_id:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
    return new


@torch.no_grad()
def test_noisy_accuracy_matches_naive_perturbed_generation(tiny, tmp_path):
    # Noise is keyed by each example's tokens, so batching (3 rows, left-padded) must not change what an example
    # draws: the batched sweep has to agree with the naive one-example-at-a-time loop.
    cells = {"targeted": -1.0, "gaussian_scaled": 2.0, "orthogonal": 1.5}
    out = tmp_path / "noise1"
    argv = [str(tiny.export), str(tiny.data), "--batch-size", "3", "--max-new-tokens", str(MAX_NEW), "--out", str(out),
            "--passes", "all", "--seed", "3", "--scales", *[f"{k}={v}" for k, v in cells.items()],
            "--kinds", *cells]
    assert run_cli(noise_sweep.main, argv) == 0
    report = json.loads((out / "noise_sweep.json").read_text())
    examples, tokens = _examples(tiny)
    clean = report["clean"]["accuracy"]
    drops = 0
    for cell in report["cells"]:
        perturbation = Perturbation(cell["kind"], cell["scale"], seed=3)
        correct = 0
        for ex, rec in zip(examples, tiny.records):
            new = _perturbed_generate(tiny.base, ex["input_ids"], tokens, perturbation, MAX_NEW)
            text = tiny.tokenizer.decode(new, skip_special_tokens=True)
            correct += text.split("#")[-1].replace(",", "").strip() == rec["answer"]
        assert cell["accuracy"] == pytest.approx(correct / len(examples)), cell["kind"]
        drops += cell["accuracy"] < clean
    assert drops > 0, "no noise setting changed any answer: the comparison would prove nothing"


def test_noise_sweep_rejects_bad_settings(tiny, tmp_path, capsys):
    base = [str(tiny.export), str(tiny.data), "--out", str(tmp_path / "x")]
    assert run_cli(noise_sweep.main, [*base, "--stage", "0"]) == 2
    assert "hold no latents" in capsys.readouterr().err
    assert run_cli(noise_sweep.main, [*base, "--scales", "gaussian=a,b"]) == 2
    assert "--scales 'gaussian=a,b'" in capsys.readouterr().err
    assert run_cli(noise_sweep.main, [*base, "--passes", "5"]) == 2
    assert "at most 2 latents" in capsys.readouterr().err


# -- ablations -----------------------------------------------------------------------------------------------

@torch.no_grad()
def _hand_ablation(tiny, feedback: bool, cap: int | None) -> dict:
    examples, tokens = _examples(tiny)
    nll = n = a_nll = a_n = 0.0
    correct = 0
    for ex, rec in zip(examples, tiny.records):
        prompt, seen = [], 0
        for t in ex["input_ids"]:  # keep only the first `cap` latents
            if t == tokens.latent_id:
                seen += 1
                if cap is not None and seen > cap:
                    continue
            prompt.append(t)
        steps = [t for s in ex["steps_ids"][ex["n_skipped_steps"]:] for t in s]
        ids = prompt + steps + ex["answer_ids"]
        if feedback:
            logits = tiny.base(inputs_embeds=_filled(tiny.base, ids, tokens.latent_id)).logits[0]
        else:
            logits = tiny.base(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        answer_start = len(prompt) + len(steps)
        for t in range(len(prompt), len(ids)):
            token_nll = -float(logp[t - 1, ids[t]])
            nll, n = nll + token_nll, n + 1
            if t >= answer_start:
                a_nll, a_n = a_nll + token_nll, a_n + 1
        latent_id = tokens.latent_id if feedback else -1  # -1: no latent is ever filled, plain embeddings
        gen = reference_generate(tiny.base, torch.tensor([prompt]), latent_id, tokens.eos_id, MAX_NEW)[0, len(prompt):]
        text = tiny.tokenizer.decode(gen.tolist(), skip_special_tokens=True)
        correct += text.split("#")[-1].replace(",", "").strip() == rec["answer"]
    return {"loss": nll / n, "answer_ppl": math.exp(a_nll / a_n), "accuracy": correct / len(examples)}


def test_ablations_match_plain_hf_forward(tiny, tmp_path):
    out = tmp_path / "abl"
    argv = [str(tiny.export), str(tiny.data), "--batch-size", "3", "--max-new-tokens", str(MAX_NEW), "--out", str(out)]
    assert run_cli(ablations.main, argv) == 0
    report = json.loads((out / "ablations.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["full", "no_feedback", "latents<=0", "latents<=1"]
    settings = {"full": (True, None), "no_feedback": (False, None), "latents<=0": (True, 0), "latents<=1": (True, 1)}
    for name, (feedback, cap) in settings.items():
        want = _hand_ablation(tiny, feedback, cap)
        assert rows[name]["loss"] == pytest.approx(want["loss"], rel=1e-5), name
        assert rows[name]["answer_ppl"] == pytest.approx(want["answer_ppl"], rel=1e-5), name
        assert rows[name]["accuracy"] == pytest.approx(want["accuracy"]), name
    assert rows["latents<=0"]["mean_latents"] == 0 and rows["latents<=1"]["mean_latents"] == 1
    assert rows["full"]["answer_ppl"] != pytest.approx(rows["no_feedback"]["answer_ppl"], rel=1e-3)
    table = (out / "ablations.md").read_text()
    assert table.count("\n| ") == 5 and "| no_feedback | off |" in table  # header + 4 variants
    assert_png(out / "ablations.png")


# -- probing -------------------------------------------------------------------------------------------------

def _frontier(record: dict, hops: int) -> set[int]:
    """Nodes exactly `hops` edges from the root, by expanding level sets (not a queue)."""
    reached, level = {record["root"]}, {record["root"]}
    for _ in range(hops):
        level = {v for u, v in record["edges"] if u in level} - reached
        reached |= level
    return level


@torch.no_grad()
def test_probing_matches_lm_head_on_fed_states(tiny, tmp_path):
    out = tmp_path / "probe"
    argv = [str(tiny.export), str(tiny.data), "--batch-size", "3", "--top-k", "4", "--out", str(out)]
    assert run_cli(probing.main, argv) == 0
    report = json.loads((out / "probing.json").read_text())
    probes = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert_png(out / "probing.png")
    examples, tokens = _examples(tiny)
    assert len(probes) == len(examples) and report["graph_records"] == len(examples)
    top1 = {0: [], 1: []}
    for ex, rec, probe in zip(examples, tiny.records, probes):
        positions = [i for i, t in enumerate(ex["input_ids"]) if t == tokens.latent_id]
        assert probe["n_latents"] == len(positions)
        fed = _filled(tiny.base, ex["input_ids"], tokens.latent_id)[0]
        first = [tiny.tokenizer.encode(" " + name, add_special_tokens=False)[0] for name in rec["idx_to_symbol"]]
        for k, pos in enumerate(positions):
            probs = torch.softmax(tiny.base.lm_head(fed[pos]).float(), dim=-1)  # the state fed into latent k
            thought = probe["thoughts"][k]
            values, ids = torch.topk(probs, 4)
            assert [t["id"] for t in thought["top"]] == ids.tolist()
            assert [t["prob"] for t in thought["top"]] == pytest.approx(values.tolist(), rel=1e-4, abs=1e-7)
            assert thought["top"][0]["token"] == tiny.tokenizer.decode([int(ids[0])])
            mass = lambda nodes: float(sum(probs[t] for t in {first[i] for i in nodes}))  # noqa: E731
            assert thought["graph"] == pytest.approx(mass(range(len(first))), rel=1e-4, abs=1e-8)
            assert thought["frontier"] == pytest.approx(mass(_frontier(rec, k + 1)), rel=1e-4, abs=1e-8)
            assert thought["target"] == pytest.approx(float(probs[first[rec["target"]]]), rel=1e-4, abs=1e-8)
            assert thought["neg_target"] == pytest.approx(float(probs[first[rec["neg_target"]]]), rel=1e-4, abs=1e-8)
            top1[k].append(float(values[0]))
    for step in report["steps"]:
        vals = top1[step["step"]]
        assert step["n_examples"] == len(vals)
        assert step["mean_top1_prob"] == pytest.approx(sum(vals) / len(vals), rel=1e-4)


def test_probing_needs_latents(tiny, tmp_path, capsys):
    assert run_cli(probing.main, [str(tiny.export), str(tiny.data), "--stage", "0", "--out", str(tmp_path)]) == 2
    assert "no thoughts to probe" in capsys.readouterr().err


# -- training curves -----------------------------------------------------------------------------------------

def _train(step, stage, loss, tok):
    return {"kind": "train", "global_step": step, "epoch": step // 20, "stage": stage, "loss": loss, "lr": 1e-3,
            "tokens_per_s": tok, "latent_passes": stage}


def test_curves_from_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        _train(10, 0, 3.0, 100.0), _train(20, 0, 2.0, 300.0),
        {"kind": "eval", "epoch": 0, "stage": 0, "global_step": 20, "val_loss": 2.1, "accuracy": 0.1,
         "cot_exact_match": 0.0},
        _train(30, 1, 9.9, 50.0),  # the run crashed after this line; the resumed run logs step 30 again
        _train(30, 1, 1.8, 200.0), _train(40, 1, 1.5, 240.0),
        {"kind": "eval", "epoch": 1, "stage": 1, "global_step": 40, "val_loss": 1.6, "accuracy": 0.5},
        {"kind": "eval", "epoch": 1, "stage": 1, "global_step": 40, "val_loss": 1.6, "accuracy": 0.55},
        {"kind": "note", "text": "other kinds are ignored"},
        _train(50, 2, 1.2, 150.0), _train(60, 2, 1.0, 170.0),
        {"kind": "eval", "epoch": 2, "stage": 2, "global_step": 60, "val_loss": 1.1, "accuracy": 0.55},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_cli(curves.main, [str(run)]) == 0
    summary = json.loads((run / "curves" / "curves.json").read_text())
    assert_png(run / "curves" / "curves.png")
    assert summary["n_train_points"] == 6 and summary["last_step"] == 60
    assert summary["stage_boundaries"] == [{"after_step": 20, "from_stage": 0, "to_stage": 1},
                                           {"after_step": 40, "from_stage": 1, "to_stage": 2}]
    stages = {s["stage"]: s for s in summary["stages"]}
    assert (stages[1]["first_step"], stages[1]["first_loss"], stages[1]["last_loss"]) == (30, 1.8, 1.5)
    assert [stages[s]["mean_tokens_per_s"] for s in (0, 1, 2)] == pytest.approx([200.0, 220.0, 160.0])
    assert [(e["epoch"], e["accuracy"]) for e in summary["eval"]] == [(0, 0.1), (1, 0.55), (2, 0.55)]
    assert (summary["best_epoch"], summary["best_accuracy"]) == (1, 0.55)  # the first of equals, as training


def test_curves_report_the_bad_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_train(10, 0, 1.0, 1.0)) + "\n{not json\n")
    assert run_cli(curves.main, [str(path), "--out", str(tmp_path / "c")]) == 2
    assert f"{path}: line 2: invalid JSON" in capsys.readouterr().err
    path.write_text(json.dumps({"kind": "train", "global_step": 3, "stage": 0}) + "\n")
    assert run_cli(curves.main, [str(path), "--out", str(tmp_path / "c")]) == 2
    assert "line 1: train record lacks a numeric 'loss'" in capsys.readouterr().err
    assert run_cli(curves.main, [str(tmp_path / "missing_run")]) == 2
    assert "missing_run does not exist" in capsys.readouterr().err

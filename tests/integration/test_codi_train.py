"""`method: codi` trained end to end on CPU (recipes/tiny_cpu_codi.yaml, ZeRO-3 on gloo): one process, and two ranks
that must equal it (losses, weights, the projection); the export records the method, carries the projection, loads
with load_exported and scores through `coconut-scale eval` as training scored it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from child_process import subprocess_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny_cpu_codi.yaml"
TIMEOUT = 420


def _overrides(out: Path, data: Path, **extra) -> list[str]:
    base = {"output_dir": str(out), "data.train_file": str(data / "train.json"), "data.val_file": str(data / "val.json"),
            "data.generate": "{kind: arithmetic_synthetic, n_train: 24, n_val: 7, seed: 1}",
            "batch.global_batch_size": 4, "batch.micro_batch_size": 2, "batch.eval_batch_size": 4,
            "eval.max_new_tokens": 8, "logging.log_every_steps": 1, "optim.grad_clip": 0.0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(launcher: str, out: Path, data: Path, **extra) -> subprocess.CompletedProcess:
    args = ["-m", "coconut_scale.train", str(RECIPE), *_overrides(out, data, **extra)]
    if launcher == "torchrun":
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"{launcher} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _command(out: Path, data: Path, **extra) -> list[str]:
    return [sys.executable, "-m", "coconut_scale.train", str(RECIPE), *_overrides(out, data, **extra)]


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _one_process_and_two_ranks(tmp_path: Path, data: Path, **extra) -> tuple[dict, dict]:
    """The same run in one process (tmp_path/one) and on two ranks (tmp_path/two): {global step: train record}."""
    _train("python", tmp_path / "one", data, **extra)
    _train("torchrun", tmp_path / "two", data, **extra)
    return tuple({r["global_step"]: r for r in _records(tmp_path / run, "train")} for run in ("one", "two"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("codi")
    data = root / "data"
    _train("python", root / "one", data)
    _train("torchrun", root / "two", data)
    return root / "one", root / "two", data


def test_the_run_logs_codi_terms_and_exports_the_method_and_projection(runs):
    one, _, _ = runs
    train = _records(one, "train")
    assert len(train) == 2 * 6  # 24 records / global batch 4, two epochs
    for r in train:
        assert {"coconut_loss", "teacher_loss", "distill_loss"} <= r.keys()
        # the weights of tiny_cpu_codi: 1 x student CE + 1 x distill + 1 x teacher CE
        assert abs(r["loss"] - (r["coconut_loss"] + r["distill_loss"] + r["teacher_loss"])) < 1e-4
    assert train[-1]["teacher_loss"] < train[0]["teacher_loss"]
    export = one / "hf" / "stage0"
    meta = json.loads((export / "coconut_config.json").read_text())
    assert meta["method"] == "codi" and meta["codi"]["num_latent"] == 2 and meta["codi"]["use_prj"] is True
    projection = load_file(str(export / "codi_projection.safetensors"))
    assert {"prj.1.weight", "prj.3.weight", "prj.ln.weight"} <= projection.keys()
    assert not any(k.startswith("codi.") for k in load_file(str(export / "model.safetensors")))


def test_two_ranks_zero3_equal_one_process(runs):
    one, two, _ = runs
    l1 = {r["global_step"]: r for r in _records(one, "train")}
    l2 = {r["global_step"]: r for r in _records(two, "train")}
    assert l1.keys() == l2.keys()
    for step in l1:
        for key in ("loss", "coconut_loss", "teacher_loss", "distill_loss"):
            assert abs(l1[step][key] - l2[step][key]) < 1e-4, (step, key, l1[step][key], l2[step][key])
    for name in ("model.safetensors", "codi_projection.safetensors"):
        a, b = load_file(str(one / "hf" / "stage0" / name)), load_file(str(two / "hf" / "stage0" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name} {key}: {m}")


def test_the_export_loads_and_the_eval_cli_scores_as_training_did(runs, tmp_path):
    from coconut_scale.model.loading import load_exported

    one, _, data = runs
    model, _, meta = load_exported(one / "hf" / "stage0")
    assert meta.method == "codi" and model.part("codi") is not None
    trained = load_file(str(one / "hf" / "stage0" / "codi_projection.safetensors"))
    for key, value in model.part("codi").state_dict().items():
        torch.testing.assert_close(value, trained[key])
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "coconut_scale", "eval", str(one / "hf" / "stage0"),
                           str(data / "val.json"), "--max-new-tokens", "8", "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = _records(one, "eval")[-1]
    summary = json.loads(next(out.glob("*.json")).read_text())
    assert summary["n_examples"] == logged["n_examples"] == 7
    assert summary["accuracy"] == pytest.approx(logged["accuracy"])


def test_simcot_on_codi_two_ranks_zero3_equal_one_process(tmp_path):
    """SIM-CoT's step decoder on CODI's latents (a second, fully trained model under ZeRO-3): the step term is
    logged and weighted into the loss, and two ranks equal one process."""
    data = tmp_path / "data"
    simcot = {"coconut.step_supervision.enabled": "true", "coconut.step_supervision.weight": 0.5, "optim.epochs": 1}
    l1, l2 = _one_process_and_two_ranks(tmp_path, data, **simcot)
    assert l1.keys() == l2.keys() and len(l1) == 6
    for step, r in l1.items():
        assert r["step_loss"] > 0
        assert abs(r["loss"] - (r["coconut_loss"] + r["distill_loss"] + r["teacher_loss"] + 0.5 * r["step_loss"])) < 1e-4
        for key in ("loss", "coconut_loss", "teacher_loss", "distill_loss", "step_loss"):
            assert abs(r[key] - l2[step][key]) < 1e-4, (step, key, r[key], l2[step][key])


def test_decode_latents_reads_a_simcot_on_codi_export(tmp_path):
    """SIM-CoT on CODI exported with its decoder: it loads in the "codi" layout, `coconut-scale decode-latents`
    scores one row per step that training supervises (z_0..z_n; with include_last_cot the 3-step records give z_n
    a target), each decoded as a plain greedy loop on the training step loss's decoder input decodes it, and the
    export without its decoder is refused naming what trains one."""
    from coconut_scale.data.codi_data import build_codi_rows
    from coconut_scale.data.codi_features import CodiPartCollator, codi_data_options, codi_feature, codi_token_ids
    from coconut_scale.data.codi_steps import PAD, CodiStepCollator, get_steps, step_ids
    from coconut_scale.data.collate import LatentAlignedCollator
    from coconut_scale.data.records import load_records
    from coconut_scale.model.loading import load_exported_with_step_decoder
    from coconut_scale.model.tokens import LatentTokens

    data, out = tmp_path / "data", tmp_path / "run"
    _train("python", out, data, **{"coconut.step_supervision.enabled": "true",
                                   "coconut.step_supervision.export_decoder": "true",
                                   "codi.include_last_cot": "true", "optim.epochs": 1})
    export = out / "hf" / "stage0"
    model, tokenizer, meta, step = load_exported_with_step_decoder(export)
    part = model.part("step_supervision")
    assert part.layout == "codi" and part.c_thought == step.c_thought == 1 and part.decoder is not None
    decoded = tmp_path / "decode"
    proc = subprocess.run([sys.executable, "-m", "coconut_scale", "decode-latents", str(export), str(data / "val.json"),
                           "--max-new-tokens", "8", "--out", str(decoded)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((decoded / "decode_latents.json").read_text())
    assert "exact match" in (decoded / "decode_latents.txt").read_text()
    tokens = LatentTokens.from_tokenizer(tokenizer)
    rows, _ = build_codi_rows(load_records(data / "val.json"), tokenizer, codi_token_ids(tokens),
                              codi_data_options(meta.codi))
    steps = get_steps([r["teacher_input_ids"] for r in rows], 3, step_ids(tokenizer, tokens.eos_id, tokens.pad_id))
    expected = {(r["index"], k): tokenizer.decode(s[:-1]).strip()
                for r, row in zip(rows, steps) for k, s in enumerate(row) if s != [PAD]}
    assert {(r["idx"], r["step"]): r["gold"] for r in report["rows"]} == expected
    assert {k for _, k in expected} == {0, 1, 2} and report["overall"]["n"] == len(expected)
    # The trained decoder read back: each decoded step equals a plain greedy loop fed the thought the training
    # step loss gives the decoder for that record ([z_k, tokens so far], positions 0..).
    features = [codi_feature(r, tokens, 2) for r in rows]
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    pairs = CodiStepCollator(step_ids(tokenizer, tokens.eos_id, tokens.pad_id), 2, dedup_bug=False)(features)
    calls = []
    part.decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["inputs_embeds"]), with_kwargs=True)
    embed = model.base_causallm.get_input_embeddings()
    decoded_rows = {(r["idx"], r["step"]): r["decoded"] for r in report["rows"]}
    with torch.no_grad():
        model.eval()(**collate(features), latent_columns=collate.latent_columns(features),
                     part_inputs={"codi": CodiPartCollator(tokens.pad_id, collate)(features), "step_supervision": pairs})
        thoughts = calls[0][:, :1]
        for i, (r, k) in enumerate(zip(pairs["step_rows"].tolist(), pairs["step_index"].tolist())):
            ids = []
            for _ in range(8):
                seq = torch.cat([thoughts[i], embed(torch.tensor(ids, dtype=torch.long))])[None]
                token = int(part.decoder(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).logits[0, -1]
                            .argmax())
                if token == tokens.eos_id:
                    break
                ids.append(token)
            assert decoded_rows[(rows[r]["index"], k)] == tokenizer.decode(ids).strip(), (rows[r]["index"], k)

    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    shutil.rmtree(bare / "step_decoder")
    proc = subprocess.run([sys.executable, "-m", "coconut_scale", "decode-latents", str(bare), str(data / "val.json")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "a method codi export" in proc.stderr, proc.stderr[-2000:]
    assert "coconut.step_supervision.export_decoder: true" in proc.stderr


def test_kill_9_mid_epoch_then_rerun_resumes_to_the_same_weights(runs, tmp_path):
    """SIGKILL right after the mid-epoch checkpoint at step 3 (of 6 per epoch), rerun: the same logged terms and the
    same final weights and projection as the uninterrupted run."""
    one, _, data = runs
    out, every = tmp_path / "killed", {"checkpoint.save_every_steps": 3}
    proc = subprocess.Popen(_command(out, data, **every), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target, deadline = out / "checkpoints" / "step-00000003", time.time() + TIMEOUT
    while not target.exists():
        assert proc.poll() is None, "the run ended before the checkpoint to kill at"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "hf" / "stage0").exists()
    assert "resumed from" in _train("python", out, data, **every).stdout
    l1 = {r["global_step"]: r for r in _records(one, "train")}
    lk = {r["global_step"]: r for r in _records(out, "train")}
    for step in l1:
        for key in ("loss", "teacher_loss", "distill_loss"):
            assert abs(l1[step][key] - lk[step][key]) < 1e-4, (step, key)
    for name in ("model.safetensors", "codi_projection.safetensors"):
        a, b = load_file(str(one / "hf" / "stage0" / name)), load_file(str(out / "hf" / "stage0" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name} {key}: {m}")


def test_universal_copy_resumes_a_two_rank_run_on_one_process(runs, tmp_path):
    """2 ranks -> 1: the ZeRO-3 checkpoint after epoch 0 (the CODI part partitioned with the base), converted to
    DeepSpeed's universal format, resumes in one process and ends where the single-process run ends."""
    one, two, data = runs
    out = tmp_path / "two_then_one"
    shutil.copytree(two, out)
    final, boundary = sorted((out / "checkpoints").glob("step-*"))[::-1][:2]
    shutil.rmtree(final)
    for export in ("stage0", "best"):
        shutil.rmtree(out / "hf" / export, ignore_errors=True)
    assert json.loads((boundary / "loop_state.json").read_text())["world_size"] == 2
    convert = subprocess.run([sys.executable, "-m", "coconut_scale.universal", str(out)], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert convert.returncode == 0, convert.stdout[-2000:] + convert.stderr[-4000:]
    assert "(universal copy)" in _train("python", out, data).stdout
    l1 = {r["global_step"]: r for r in _records(one, "train")}
    lu = {r["global_step"]: r for r in _records(out, "train")}
    for step in range(7, 13):  # epoch 1, trained by the resumed single process
        assert abs(l1[step]["loss"] - lu[step]["loss"]) < 1e-4, (step, l1[step]["loss"], lu[step]["loss"])
    for name in ("model.safetensors", "codi_projection.safetensors"):
        a, b = load_file(str(one / "hf" / "stage0" / name)), load_file(str(out / "hf" / "stage0" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name} {key}: {m}")


def test_the_analyses_run_on_a_codi_export(runs, tmp_path):
    """ablations' teacher-forced loss of the full model is the student CE training logged as val_loss (the same
    answer tokens under the same latents); noise-sweep and probing run on the export."""
    one, _, data = runs
    export = one / "hf" / "stage0"
    for tool in ("ablations", "noise-sweep", "probing"):
        out = tmp_path / tool
        proc = subprocess.run([sys.executable, "-m", "coconut_scale", tool, str(export), str(data / "val.json"),
                               "--max-new-tokens", "8", "--out", str(out)], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, f"{tool}: {proc.stderr[-3000:]}"
    rows = json.loads((tmp_path / "ablations" / "ablations.json").read_text())["rows"]
    full = next(r for r in rows if r["variant"] == "full")
    assert full["loss"] == pytest.approx(_records(one, "eval")[-1]["val_loss"], rel=1e-5)


def test_lora_under_zero3_two_ranks_equal_one_process(tmp_path):
    """CODI with LoRA (teacher and student share the adapters) under ZeRO-3: two ranks equal one process in every
    logged term and in the trained adapter and projection; the export holds the merged model, the adapter and the
    projection, and loads as a CODI model."""
    from coconut_scale.model.loading import load_exported

    data = tmp_path / "data"
    lora = {"lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.0, "optim.epochs": 1}
    l1, l2 = _one_process_and_two_ranks(tmp_path, data, **lora)
    assert l1.keys() == l2.keys() and len(l1) == 6
    for step, r in l1.items():
        for key in ("loss", "coconut_loss", "teacher_loss", "distill_loss"):
            assert abs(r[key] - l2[step][key]) < 1e-4, (step, key, r[key], l2[step][key])
    exports = [tmp_path / run / "hf" / "stage0" for run in ("one", "two")]
    for name in ("adapter/adapter_model.safetensors", "codi_projection.safetensors", "model.safetensors"):
        a, b = (load_file(str(e / name)) for e in exports)
        assert a.keys() == b.keys() and a, name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name} {key}: {m}")
    adapter = load_file(str(exports[0] / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in adapter.items())  # the adapters trained
    model, _, meta = load_exported(exports[0])
    assert meta.method == "codi" and model.part("codi") is not None

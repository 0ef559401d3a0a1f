"""LoRA (peft) with trainable Coconut token rows: in-process unit tests, then DeepSpeed runs on CPU (gloo).

Unit tests (no DeepSpeed): what apply_lora makes trainable, that the new rows act only on Coconut tokens,
that the merged state and the saved adapter reproduce the live model (tied GPT-2 with Conv1D, Llama).

Runs (all under a timeout; shared between tests by module-scoped fixtures), on a tiny base model saved to
disk without the Coconut tokens (as a hub model would be):
  * coconut_scale.train with recipes/tiny_cpu_lora.yaml through a stage boundary (stage 0 -> 1, optimizer
    reset): 1 process ZeRO-3, 2 ranks ZeRO-3 (torchrun), 1 process ZeRO-2, 1 process ZeRO-0.
  * this file as a script under torchrun (2 ranks, ZeRO-3), for Llama and tied GPT-2: state before/after a few
    steps, export (merged + adapter), and the engine's own logits, which the reloads must reproduce.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a torchrun script: tests/model is sys.path[0], the package may not be installed
    sys.path.insert(0, str(REPO))

from coconut_scale.model.lora import (
    ADAPTER_DIR,
    NEW_ROWS,
    NEW_TOKENS_FILE,
    LoraExport,
    apply_lora,
    load_lora_adapter,
    new_token_rows,
)
from coconut_scale.model import Coconut
from coconut_scale.config.recipe import LoraCfg, default_lora_targets
from coconut_scale.testing import tiny_model
from coconut_scale.model.tokens import LatentTokens

LORA_RECIPE = REPO / "recipes" / "tiny_cpu_lora.yaml"
TIMEOUT = 420  # a loaded 2-core machine: a hang fails, slowness does not


# ----------------------------------------------------------------------------------------------------------
# Unit tests, in process

def _lora_model(arch: str, rank: int = 4, alpha: int = 8, targets=None):
    base, tok = tiny_model(arch)
    plain = copy.deepcopy(base)
    t = LatentTokens.from_tokenizer(tok)
    model = Coconut(base, t.latent_id, t.start_id, t.end_id, t.eos_id)
    recipe = SimpleNamespace(lora=LoraCfg(enabled=True, rank=rank, alpha=alpha, dropout=0.0, target_modules=targets))
    apply_lora(model, recipe.lora, tok)
    return model.eval(), plain.eval(), tok, t


def _ids(t: LatentTokens) -> torch.Tensor:
    return torch.tensor([[5, 6, 7, t.start_id, t.latent_id, t.end_id, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _perturb_trainables(model, seed=0, scale=0.1):
    """Trained-looking adapters: B and the new rows start at zero, where a merge bug would not show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _is_adapter_or_rows(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith(f"{NEW_ROWS}.delta")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_lora_trains_only_adapters_and_new_rows_and_starts_from_the_base(arch):
    model, plain, tok, t = _lora_model(arch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(_is_adapter_or_rows(n) for n in trainable), trainable
    assert sum(n.endswith(f"{NEW_ROWS}.delta") for n in trainable) == 1
    # The default targets of the architecture in both layers: Llama 7 projections; GPT-2 c_attn, c_fc and
    # c_proj, a name that both attention and MLP use.
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[1] for n in trainable if ".lora_A." in n}
    assert adapted == set(default_lora_targets(arch))
    assert sum(".lora_A." in n for n in trainable) == {"llama": 2 * 7, "gpt2": 2 * 4}[arch]
    rows = new_token_rows(model)
    assert rows.token_ids == [t.start_id, t.latent_id, t.end_id] and rows.delta.shape == (3, 64)
    assert rows.tied == (arch == "gpt2")
    # B = 0 and delta = 0: exactly the base model before training.
    ids = _ids(t)
    torch.testing.assert_close(_logits(model.base_causallm, ids), _logits(plain, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_new_rows_change_only_coconut_token_embeddings_and_tied_logits(arch):
    model, plain, tok, t = _lora_model(arch)
    rows = new_token_rows(model)
    delta = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows.delta.copy_(delta)
    ids = _ids(t)
    emb = model.base_causallm.get_input_embeddings()
    got, ref = emb(ids).detach(), plain.get_input_embeddings()(ids).detach()
    new = torch.isin(ids, torch.tensor(rows.token_ids))
    torch.testing.assert_close(got[~new], ref[~new], rtol=0, atol=0)
    for k, token in enumerate(rows.token_ids):
        torch.testing.assert_close(got[ids == token], ref[ids == token] + delta[k], rtol=0, atol=1e-6)
    # A tied lm_head sees the moved rows too (as a merged export will); an untied one does not.
    row_ids = torch.tensor([[5, 6, 7]])  # no Coconut token in the input: only the output side can differ
    diff = (_logits(model.base_causallm, row_ids) - _logits(plain, row_ids)).abs().amax(dim=(0, 1))
    other = torch.ones_like(diff, dtype=torch.bool)
    other[rows.token_ids] = False
    assert float(diff[other].max()) < 1e-6
    if arch == "gpt2":
        assert float(diff[rows.token_ids].min()) > 1e-3
    else:
        assert float(diff[rows.token_ids].max()) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_state_and_saved_adapter_reproduce_the_live_model(arch, tmp_path):
    """GPT-2: Conv1D weights are stored transposed, including the square attn.c_proj, and the lm_head is tied."""
    model, plain, tok, t = _lora_model(arch)
    _perturb_trainables(model)
    ids = _ids(t)
    live = _logits(model, ids)
    export = LoraExport(model)
    state = model.base_causallm.state_dict()
    _, merged = export(state)
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(merged, strict=True)
    merged_model = Coconut(fresh, t.latent_id, t.start_id, t.end_id, t.eos_id).eval()
    torch.testing.assert_close(_logits(merged_model, ids), live, rtol=1e-5, atol=1e-5)

    out = export.write_extras(state, tmp_path, tok)
    assert out == tmp_path / ADAPTER_DIR
    assert {"adapter_config.json", "adapter_model.safetensors", NEW_TOKENS_FILE, "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    reloaded = load_lora_adapter(copy.deepcopy(plain), out)
    wrapped = Coconut(reloaded, t.latent_id, t.start_id, t.end_id, t.eos_id).eval()
    torch.testing.assert_close(_logits(wrapped, ids), live, rtol=1e-5, atol=1e-5)


def test_bad_target_modules_fail_naming_them():
    with pytest.raises(ValueError, match="nope_proj"):
        _lora_model("llama", targets=["nope_proj"])


def test_adapter_refuses_a_base_with_other_embedding_tying(tmp_path):
    model, plain, tok, t = _lora_model("llama")
    export = LoraExport(model)
    export.write_extras(model.base_causallm.state_dict(), tmp_path)
    tied, _ = tiny_model("llama", tok, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied"):
        load_lora_adapter(tied, tmp_path / ADAPTER_DIR)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed runs

def _env():
    from child_process import subprocess_env  # (tests/ is on sys.path under pytest, not in the torchrun script)

    return subprocess_env(HF_HUB_OFFLINE="1")


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _write_base(directory: Path, data: Path, arch: str) -> None:
    """Data files, and a tokenizer fit on them (short sequences) with a random model of its vocabulary."""
    from transformers import AutoModelForCausalLM

    from coconut_scale.data import prosqa_synthetic
    from coconut_scale.data.records import write_records
    from coconut_scale.testing import tiny_config, tiny_tokenizer

    records = prosqa_synthetic.generate(n=32, seed=5)
    write_records(records, data / "train.json")
    write_records(prosqa_synthetic.generate(n=5, seed=6, exclude_questions={r["question"] for r in records}),
                  data / "val.json")
    corpus = [r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"] for r in records]
    tokenizer = tiny_tokenizer(vocab_size=384, corpus=corpus, with_latent_tokens=False)
    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def _base(root: Path, arch: str) -> tuple[Path, Path]:
    """(base model directory, data directory) for `arch`, written once per module."""
    base_dir, data = root / f"base_{arch}", root / f"data_{arch}"
    if not (base_dir / "config.json").exists():
        _write_base(base_dir, data, arch)
    return base_dir, data


def _overrides(out: Path, root: Path, arch: str = "llama", **extra) -> list[str]:
    base_dir, data = _base(root, arch)
    base = {
        "output_dir": str(out),
        # A base from disk, as a hub model: the same weights whatever the ZeRO stage (a from_config random
        # init under ZeRO-3's zero.Init draws other numbers than without it), resized for the Coconut tokens.
        "model.name_or_path": str(base_dir),
        "model.tokenizer": str(base_dir),
        "model.from_config": "null",
        "data.train_file": str(data / "train.json"),
        "data.val_file": str(data / "val.json"),
        "data.generate": "null",
        "optim.epochs": 2,  # stage 0 -> stage 1 with an optimizer reset
        "optim.grad_clip": 0.0,
        "lora.dropout": 0.0,  # dropout masks differ between 1 and 2 processes
        "coconut.uniform_prob": 0.3,  # ranks hold different latent counts in one step
        "batch.global_batch_size": 4,
        "batch.micro_batch_size": 2,
        "batch.eval_batch_size": 4,
        "eval.max_new_tokens": 4,
        "logging.log_every_steps": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _train(launcher: str, out: Path, root: Path, **extra) -> subprocess.CompletedProcess:
    args = ["-m", "coconut_scale.train", str(LORA_RECIPE), *_overrides(out, root, **extra)]
    cmd = [sys.executable, *args] if launcher == "python" else _torchrun(*args)
    return _run(cmd, f"{launcher} LoRA training {out.name}")


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = out / "hf" / "stage1"
    tensors = {f"adapter/{k}": v for k, v in load_file(str(final / ADAPTER_DIR / "adapter_model.safetensors")).items()}
    tensors.update({f"rows/{k}": v for k, v in load_file(str(final / ADAPTER_DIR / NEW_TOKENS_FILE)).items()})
    tensors.update({f"merged/{k}": v for k, v in load_file(str(final / "model.safetensors")).items()})
    return tensors


def _assert_close_tensors(a: dict, b: dict, atol=2e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def single_zero3(root):
    out = root / "zero3_1"
    proc = _train("python", out, root)
    return out, proc


@pytest.mark.slow
def test_two_ranks_zero3_lora_equals_single_process(root, single_zero3, train_losses):
    single, proc1 = single_zero3
    two = root / "zero3_2"
    proc2 = _train("torchrun", two, root)
    for proc in (proc1, proc2):
        assert "stage 0 -> 1: optimizer state and LR schedule reset" in proc.stdout
        assert "ZeRO stage 3" in proc.stdout
    l1, l2 = train_losses(single), train_losses(two)
    assert len(l1) == 2 * 8 and l1.keys() == l2.keys()  # 32 records / global batch 4, two epochs
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    w1, w2 = _final_tensors(single), _final_tensors(two)
    _assert_close_tensors(w1, w2)
    # Training moved the adapters (B starts at zero): the comparison above is not between two initial states.
    b = [v for k, v in w1.items() if k.startswith("adapter/") and ".lora_B." in k]
    assert b and all(float(v.abs().max()) > 1e-4 for v in b)


@pytest.mark.slow
@pytest.mark.parametrize("stage, ds_json", [(2, "zero2_fp32.json"), (0, "zero0_bf16.json")], ids=["zero2", "zero0"])
def test_one_gpu_paths_train_like_zero3(root, single_zero3, stage, ds_json, train_losses):
    """The one-GPU LoRA paths: ZeRO-2, and ZeRO-0 (llama8b_gsm_lora's config; its bf16 follows model.dtype,
    fp32 here) keep whole weights and plain state dicts, and must give the ZeRO-3 run's numbers."""
    single, _ = single_zero3
    out = root / f"zero{stage}_1"
    proc = _train("python", out, root, **{"deepspeed.config": f"ds_configs/{ds_json}", "deepspeed.overrides": "{}"})
    assert f"ZeRO stage {stage}" in proc.stdout
    l3, l1 = train_losses(single), train_losses(out)
    assert l3.keys() == l1.keys()
    for step in l3:
        assert abs(l3[step] - l1[step]) < 1e-4, (step, l3[step], l1[step])
    _assert_close_tensors(_final_tensors(single), _final_tensors(out))


@pytest.mark.slow
@pytest.mark.parametrize("ds_json", ["zero3_bf16.json", "zero0_bf16.json"], ids=["zero3", "zero0"])
def test_bf16_lora_trains_like_fp32(root, single_zero3, ds_json, train_losses):
    """bf16, as every GPU recipe trains: DeepSpeed flattens the trainable parameters into one buffer per dtype, so
    the adapters must share the token rows' dtype (peft's default upcast to fp32 stopped the ZeRO-3 engine at
    initialize). The losses follow the fp32 run's to bf16 precision."""
    single, _ = single_zero3
    out = root / f"bf16_{ds_json.split('_')[0]}"
    proc = _train("python", out, root, **{"model.dtype": "bf16", "deepspeed.config": f"ds_configs/{ds_json}"})
    assert f"ZeRO stage {ds_json[4]}" in proc.stdout
    fp32, bf16 = train_losses(single), train_losses(out)
    assert fp32.keys() == bf16.keys()
    for step in fp32:
        assert abs(fp32[step] - bf16[step]) < 0.05 * abs(fp32[step]), (step, fp32[step], bf16[step])


# Roundtrip runs: this file as a 2-rank ZeRO-3 script, on a base model loaded from disk (as a hub model would
# be), whose vocabulary lacks the Coconut tokens: the engine resizes it under ZeRO-3, and the adapter must
# put the rows back onto that same base.

@pytest.fixture(scope="module", params=["llama", "gpt2"])
def roundtrip(request, root):
    arch = request.param
    work = root / f"roundtrip_{arch}"
    overrides = _overrides(work, root, arch, **{"coconut.uniform_prob": 0.0})
    base_dir, _ = _base(root, arch)
    _run(_torchrun(str(Path(__file__).resolve()), str(work), *overrides), f"{arch} roundtrip script")
    result = torch.load(work / "result.pt", weights_only=False)
    return arch, work, base_dir, result


def _coconut(base, tokenizer) -> Coconut:
    t = LatentTokens.from_tokenizer(tokenizer)
    return Coconut(base, t.latent_id, t.start_id, t.end_id, t.eos_id).eval()


def _engine_logits(result) -> tuple[torch.Tensor, torch.Tensor]:
    batch = result["batch"]
    assert int((batch["input_ids"] == result["latent_id"]).sum()) > 0, "the check batch must hold latents"
    return batch, result["logits"]


def _reload_logits(model, batch, num_passes) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, num_passes=num_passes, return_logits=True).logits


@pytest.mark.slow
def test_only_adapters_and_new_token_rows_change(roundtrip):
    arch, work, _, result = roundtrip
    before, after = result["before"], result["after"]
    assert before.keys() == after.keys()
    trainable = set(result["trainable"])
    assert trainable and all(_is_adapter_or_rows(n) for n in trainable), trainable
    changed_lora = 0
    for key in before:
        if key in trainable:
            continue
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"  # embeddings: every row
    for key in trainable:
        if ".lora_B." in key:
            assert float(before[key].abs().max()) == 0.0  # peft's init: the adapter starts as a no-op
        if ".lora_" in key:
            changed_lora += not torch.equal(before[key], after[key])
    assert changed_lora == len(trainable) - 1, "every adapter tensor trained"
    (delta_key,) = [k for k in trainable if k.endswith(f"{NEW_ROWS}.delta")]
    start, latent, end = result["new_ids"]
    moved = (after[delta_key] - before[delta_key]).abs().amax(dim=1)
    # <|start-latent|> and <|end-latent|> are read as embeddings. (The <|latent|> row is not: Coconut replaces
    # that position's embedding with a hidden state, so its row receives no gradient in coconut mode.)
    assert float(moved[0]) > 0 and float(moved[2]) > 0, moved

    # The merged export, seen as plain weights: base rows untouched except the Coconut tokens' rows.
    from safetensors.torch import load_file

    merged = load_file(str(work / "export" / "model.safetensors"))
    emb_name = next(k for k in before if k.endswith(f"{NEW_ROWS}.delta")).rsplit(f".{NEW_ROWS}", 1)[0]
    emb_key = emb_name.split("base_model.model.", 1)[1] + ".weight"
    base_emb = before[emb_name + ".weight"]
    keep = torch.ones(base_emb.shape[0], dtype=torch.bool)
    keep[[start, latent, end]] = False
    assert torch.equal(merged[emb_key][keep], base_emb[keep])
    assert not torch.equal(merged[emb_key][[start, end]], base_emb[[start, end]])
    for name, tensor in merged.items():
        peft_key = f"base_causallm.base_model.model.{name}"
        if peft_key in before:  # not adapted (norms, embeddings, lm_head): bit-identical to the base
            if name != emb_key:
                assert torch.equal(tensor, before[peft_key]), name
        else:  # adapted: base_layer + B @ A
            layer = peft_key.rsplit(".", 1)[0] + ".base_layer.weight"
            assert layer in before, name
            assert not torch.equal(tensor, before[layer]), f"{name} did not get its adapter merged"


@pytest.mark.slow
def test_zero3_adapter_holds_real_tensors_and_reloads_onto_the_base(roundtrip):
    from safetensors.torch import load_file

    arch, work, base_dir, result = roundtrip
    after = result["after"]
    adapter = work / "export" / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert set(config["target_modules"]) == set(default_lora_targets(arch))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    lora_keys = [k for k in after if ".lora_" in k]
    assert len(saved) == len(lora_keys) > 0
    for key in lora_keys:
        # peft's file names: no wrapper prefix, no adapter name
        name = key[len("base_causallm."):].replace(".default.", ".")
        assert saved[name].numel() > 0 and saved[name].shape == after[key].shape, name
        assert torch.equal(saved[name], after[key]), name
    rows = load_file(str(adapter / NEW_TOKENS_FILE))
    assert rows["token_ids"].tolist() == list(result["new_ids"])
    assert rows["input_rows"].shape == (3, 64) and ("output_rows" in rows) == (arch == "llama")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()  # the user's base: no Coconut tokens
    vocab = base.get_input_embeddings().num_embeddings
    emb_key = next(k for k in result["before"] if k.endswith("embed_tokens.weight") or k.endswith("wte.weight"))
    assert vocab == result["before"][emb_key].shape[0] - 3
    assert torch.equal(base.get_input_embeddings().weight, result["before"][emb_key][:vocab])
    model = _coconut(load_lora_adapter(base, adapter), AutoTokenizer.from_pretrained(str(adapter)))
    batch, logits = _engine_logits(result)
    torch.testing.assert_close(_reload_logits(model, batch, result["num_passes"]), logits, rtol=1e-5, atol=1e-5)
    with model.base_causallm.disable_adapter():  # the adapter is what makes the match: without it, no match
        assert float((_reload_logits(model, batch, result["num_passes"]) - logits).abs().max()) > 1e-3


@pytest.mark.slow
def test_zero3_merged_export_reproduces_engine_logits(roundtrip):
    from coconut_scale.model.loading import load_exported

    arch, work, _, result = roundtrip
    model, _, meta = load_exported(work / "export")
    assert meta.tokens.latent_id == result["latent_id"]
    batch, logits = _engine_logits(result)
    torch.testing.assert_close(_reload_logits(model.eval(), batch, result["num_passes"]), logits,
                               rtol=1e-5, atol=1e-5)


def _roundtrip_main(workdir: str, overrides: list[str]) -> None:
    """Under torchrun, ZeRO-3: a few LoRA steps on stage-1 batches, then export (merged + adapter), and save
    the consolidated state before and after and the engine's logits on one batch (rank 0)."""
    from coconut_scale import distributed as dist
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.train.export import export_hf
    from coconut_scale.model.export_meta import ExportMeta
    from coconut_scale.config.model_shape import hidden_size
    from coconut_scale.data.curriculum import CurriculumConfig
    from coconut_scale.data.collate import LatentAlignedCollator
    from coconut_scale.data.curriculum import build_stage_dataset
    from coconut_scale.config.ds_config import build_ds_config
    from coconut_scale.train.engine import build_engine
    from coconut_scale.train.strategy import init_distributed
    from coconut_scale.config.recipe import load_recipe
    from coconut_scale.data.tokenized import load_tokenized
    from coconut_scale.train.run_data import prepare_data, recipe_tokenizer

    recipe = load_recipe(LORA_RECIPE, overrides)
    init_distributed()
    rank, world = dist.rank(), dist.world_size()
    prepare_data(recipe, lambda *_: None)
    tokenizer = recipe_tokenizer(recipe)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    plan = resolve_batch(recipe.batch, world, recipe.data.max_seq_len)
    ds_config = build_ds_config(recipe, plan, hidden_size(recipe))
    bundle = build_engine(recipe, ds_config, tokenizer, 10, log=lambda *_: None)
    engine, model = bundle.engine, bundle.model
    assert ds_config["zero_optimization"]["stage"] == 3

    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    recs, _ = load_tokenized(recipe.data.train_file, tokenizer, recipe.data.max_seq_len, None, cfg.c_thought,
                             cfg.max_latent_stage)
    data = build_stage_dataset(recs[:16], 1, cfg, tokens, seed=0)
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    mb = plan.micro_batch_size

    def batch_at(i: int) -> dict:
        start = (i * mb) % len(data)
        return collate([data[j] for j in range(start, start + mb)])

    before = bundle.consolidated_state_dict()
    engine.train()
    for i in range(4 * plan.grad_accum):  # 4 optimizer steps, each rank its own micro batches
        batch = batch_at(i * world + rank)
        passes = dist.all_reduce_max(model.count_passes(batch["input_ids"]))
        engine.backward(engine(**batch, num_passes=passes).loss)
        engine.step()
    after = bundle.consolidated_state_dict()
    export_hf(bundle, tokenizer, Path(workdir) / "export", ExportMeta(c_thought=cfg.c_thought, tokens=tokens),
              lora=True)
    engine.eval()
    check = collate([data[j] for j in range(4)])  # the same batch on every rank
    passes = dist.all_reduce_max(model.count_passes(check["input_ids"]))
    with torch.no_grad():
        logits = engine(**check, num_passes=passes, return_logits=True).logits
    if dist.is_main():
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        torch.save({"before": before, "after": after, "trainable": trainable, "batch": check, "logits": logits,
                    "num_passes": passes, "latent_id": tokens.latent_id,
                    "new_ids": [tokens.start_id, tokens.latent_id, tokens.end_id]}, Path(workdir) / "result.pt")
    dist.barrier()


if __name__ == "__main__":
    _roundtrip_main(sys.argv[1], sys.argv[2:])

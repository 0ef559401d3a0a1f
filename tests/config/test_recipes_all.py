"""Every shipped recipe validates, plans its batch and fills its DeepSpeed config at every world size it lists."""

import json
import re
from pathlib import Path

import pytest

from coconut_scale.config.batch_plan import batch_table, resolve_batch
from coconut_scale.cli.check import main
from coconut_scale.config.memory import estimate_memory
from coconut_scale.config.model_shape import recipe_shape
from coconut_scale.config.ds_config import build_ds_config
from coconut_scale.model.shapes import dims
from coconut_scale.config.recipe import check_files, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPES]
# The header convention (launch command, batch table) is checked on the recipes of this package's configuration
# layer; demo_cpu.yaml belongs to the trainer and is only validated.
DOCUMENTED = [p for p in RECIPES if p.stem != "demo_cpu"]


def test_the_expected_recipes_exist():
    assert {"gpt2_gsm_cot", "gpt2_gsm_coconut", "gpt2_prosqa", "gpt2_prontoqa", "llama8b_gsm", "llama8b_gsm_lora",
            "qwen3_4b_gsm", "qwen3_4b_gsm_lora", "tiny_cpu"} <= set(NAMES)


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_validates_and_resolves_every_world_size(path):
    r = load_recipe(path)
    assert r.name == path.stem and r.output_dir == f"runs/{path.stem}"
    check_files(r, data=False)  # its DeepSpeed JSON exists
    hidden = dims(recipe_shape(r)).hidden
    plans = batch_table(r)
    assert [p.world_size for p in plans] == r.batch.world_sizes
    for plan in plans:
        assert plan.micro_batch_size * plan.world_size * plan.grad_accum == r.batch.global_batch_size
        cfg = build_ds_config(r, plan, hidden)
        assert "auto" not in json.dumps(cfg)
        assert cfg["train_batch_size"] == r.batch.global_batch_size
        assert cfg["bf16"]["enabled"] == (r.model.dtype == "bf16")


@pytest.mark.parametrize("path", DOCUMENTED, ids=[p.stem for p in DOCUMENTED])
def test_header_documents_launch_and_matches_the_batch_table(path):
    text = path.read_text()
    header = text.split("\nname:")[0]
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    launch = re.search(r"(deepspeed --num_gpus \d+ --module|torchrun .*-m|python -m) coconut_scale\.train "
                       rf"recipes/{path.name}", header)
    assert launch, "the header must give the exact launch command"
    assert "Assumes:" in header and "Batch table" in header
    r = load_recipe(path)
    rows = re.findall(r"^#\s+(\d+)\s+(\d+)\s+(\d+)\b", header, flags=re.M)
    assert {int(ws) for ws, _, _ in rows} >= set(r.batch.world_sizes), "every listed world size has a row"
    for ws, micro, accum in rows:
        plan = resolve_batch(r.batch, int(ws), r.data.max_seq_len)
        assert (plan.micro_batch_size, plan.grad_accum) == (int(micro), int(accum)), f"row for {ws} GPUs"
    big = [1, 8, 16, 32, 64]
    if not path.stem.startswith("tiny_cpu"):  # every GPU recipe (not the CPU ones) documents the standard world sizes, possible or not
        documented = {int(m) for m in re.findall(r"^#\s+(\d+)\s", header.split("Batch table")[1], flags=re.M)}
        assert set(big) <= documented


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_rendered_configs_are_accepted_by_deepspeed(path, monkeypatch):
    ds_config_mod = pytest.importorskip("deepspeed.runtime.config")
    # Let DeepSpeed take the world size from our stand-in for a model-parallel unit, without a process group.
    monkeypatch.setattr(ds_config_mod.dist, "get_rank", lambda *a, **k: 0)

    class DataParallel:
        def __init__(self, world_size):
            self.world_size = world_size

        def get_data_parallel_world_size(self):
            return self.world_size

    r = load_recipe(path)
    hidden = dims(recipe_shape(r)).hidden
    for plan in batch_table(r):
        cfg = build_ds_config(r, plan, hidden)
        parsed = ds_config_mod.DeepSpeedConfig(cfg, mpu=DataParallel(plan.world_size))
        assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == \
            (plan.global_batch_size, plan.micro_batch_size, plan.grad_accum)
        assert parsed.zero_optimization_stage == cfg["zero_optimization"]["stage"]
        assert parsed.gradient_clipping == r.optim.grad_clip


def test_paper_settings():
    cot, coconut = load_recipe(REPO / "recipes/gpt2_gsm_cot.yaml"), load_recipe(REPO / "recipes/gpt2_gsm_coconut.yaml")
    for r in (cot, coconut):
        assert (r.optim.lr, r.optim.weight_decay, r.batch.global_batch_size, r.optim.epochs) == (1e-4, 0.01, 128, 25)
        assert r.data.train_file == "data/gsm_train.json" and r.data.val_file == "data/gsm_valid.json"
        assert resolve_batch(r.batch, 4, 512).micro_batch_size == 32  # 4 GPUs x 32, as the official runs
    assert cot.coconut.mode == "cot"
    c = coconut.coconut
    assert (c.c_thought, c.epochs_per_stage, c.max_latent_stage, c.pad_latent_to_max, c.reset_optimizer) == (2, 3, 3, True, True)
    assert coconut.checkpoint.init_from == "runs/gpt2_gsm_cot/hf/best" and coconut.checkpoint.resume_from_epoch == 3
    for name in ("gpt2_prosqa", "gpt2_prontoqa"):
        r = load_recipe(REPO / f"recipes/{name}.yaml")
        c = r.coconut
        assert (c.c_thought, c.epochs_per_stage, c.max_latent_stage, r.optim.epochs) == (1, 5, 6, 50)
        assert (r.optim.lr, r.optim.weight_decay, r.batch.global_batch_size) == (1e-4, 0.01, 128)
    llama = load_recipe(REPO / "recipes/llama8b_gsm.yaml")
    assert llama.lora_targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert load_recipe(REPO / "recipes/llama8b_gsm_lora.yaml").lora.rank == 64
    qwen = load_recipe(REPO / "recipes/qwen3_4b_gsm.yaml")
    assert (qwen.optim.lr, qwen.coconut.epochs_per_stage, qwen.batch.global_batch_size, qwen.data.max_seq_len) == (1e-5, 2, 96, 512)


@pytest.mark.parametrize("recipe, world_size", [
    ("llama8b_gsm", 8), ("llama8b_gsm_lora", 1), ("qwen3_4b_gsm", 8), ("qwen3_4b_gsm_lora", 1),
])
def test_memory_fits_where_the_recipe_is_meant_to_run(recipe, world_size):
    r = load_recipe(REPO / f"recipes/{recipe}.yaml")
    assert r.gpus_assumed == world_size
    est = estimate_memory(r, world_size)
    # The estimate counts what fake tensors cannot see (DeepSpeed's buffers, the CUDA context, the allocator) and is
    # held to the fake-tensor measurement (docs/memory.md); the recipes keep 10% of the GPU free beyond it.
    assert est["total"] <= 0.9 * r.gpu_memory_gb, est


def test_check_cli_passes_on_all_recipes(capsys):
    assert main([str(p) for p in RECIPES]) == 0
    out = capsys.readouterr().out
    assert f"{len(RECIPES)}/{len(RECIPES)} recipe(s) ok" in out
    assert "ds_config[world_size=8] = {" in out and "memory per GPU" in out and "FAIL" not in out


def test_shipped_deepspeed_templates_have_no_scheduler():
    # The LR schedule is optim.* (built by the trainer); a DeepSpeed scheduler section would be refused.
    templates = sorted((REPO / "coconut_scale" / "ds_configs").glob("*.json"))
    assert len(templates) >= 6
    for path in templates:
        assert "scheduler" not in json.loads(path.read_text()), path.name

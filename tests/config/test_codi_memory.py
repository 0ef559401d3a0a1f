"""`check`'s memory model for method codi (config/memory.py): the projection counted in the weights and the
trained set (against the real module's parameter count), the teacher pass as a moment of the step, SIM-CoT's decoder
trained in full. The activation side is held to the fake-tensor measurement in tests/config/test_fake_measure.py."""

import pytest

from coconut_scale.config.memory import GIB, codi_projection_params, estimate_phases
from coconut_scale.config.recipe import recipe_from_dict
from coconut_scale.model.codi import CodiPart, CodiSpec

SHAPE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": False}


def recipe(method="coconut", lora=False, checkpointing=True, **codi):
    data = {"name": "small", "gpus_assumed": 1,
            "model": {"name_or_path": "small", "from_config": SHAPE, "dtype": "bf16",
                      "gradient_checkpointing": checkpointing},
            "data": {"train_file": "t.json", "val_file": "v.json", "max_seq_len": 32},
            "coconut": {"c_thought": 1, "max_latent_stage": 3},
            "batch": {"global_batch_size": 8, "micro_batch_size": 2},
            "optim": {"lr": 1e-4, "epochs": 1}, "deepspeed": {"config": "ds_configs/zero0_bf16.json"},
            "lora": {"enabled": lora, "rank": 4}, "method": method, "codi": {"num_latent": 3, **codi}}
    return recipe_from_dict(data)


@pytest.mark.parametrize("no_ln", [False, True])
def test_projection_count_is_the_modules(no_ln):
    r = recipe("codi", use_prj=True, prj_dim=48, prj_no_ln=no_ln)
    module = CodiPart(64, CodiSpec(num_latent=3, prj_dim=48, prj_no_ln=no_ln))
    assert codi_projection_params(r, 64) == sum(p.numel() for p in module.parameters())
    assert codi_projection_params(recipe("codi", use_prj=False), 64) == 0


@pytest.mark.parametrize("lora", [False, True])
def test_codi_trains_its_projection(lora):
    # The training phase (the optimizer step adds its fp32 gradient copy, P_t * 4, on top of the states). The
    # teacher pass's activations are held to the fake-tensor measurement (tests/config/test_fake_measure.py).
    coconut = estimate_phases(recipe(lora=lora), 1)["train"]
    codi = estimate_phases(recipe("codi", lora=lora, use_prj=True, prj_dim=48), 1)["train"]
    prj = codi_projection_params(recipe("codi", use_prj=True, prj_dim=48), 64)
    assert (codi["weights"] - coconut["weights"]) * GIB == pytest.approx(prj * 2)  # bf16
    assert (codi["optimizer"] - coconut["optimizer"]) * GIB == pytest.approx(prj * 12)  # trained, LoRA or not


def test_the_teacher_pass_is_a_moment_of_the_step():
    moments = estimate_phases(recipe("codi", use_prj=True, prj_dim=48), 1)["train"]["moments"]
    assert "teacher" in moments and "teacher" not in estimate_phases(recipe(), 1)["train"]["moments"]


def test_simcot_on_codi_trains_its_decoder_in_full_under_lora():
    from coconut_scale.model.shapes import param_count

    base = recipe("codi", lora=True, use_prj=True, prj_dim=48)
    data = base.model_dump()
    data["coconut"]["step_supervision"] = {"enabled": True, "decoder": "pretrained"}
    with_decoder = recipe_from_dict(data)
    plain, simcot = estimate_phases(base, 1)["train"], estimate_phases(with_decoder, 1)["train"]
    decoder = param_count(SHAPE)
    assert (simcot["weights"] - plain["weights"]) * GIB == pytest.approx(decoder * 2)  # bf16, once
    assert (simcot["optimizer"] - plain["optimizer"]) * GIB == pytest.approx(decoder * 12)  # fp32 m, v, master

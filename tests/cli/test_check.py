"""The memory estimator (config/memory.py) and the check report: scaling laws, LoRA vs full fine-tuning,
hand-computed numbers; the model-shape lookup the trainer shares; the LR schedule check prints."""

import json
import math
from pathlib import Path

import pytest
import torch

from coconut_scale.cli.check import check_recipe, main
from coconut_scale.config.memory import (GIB, GPU_COMPONENTS, OVERHEAD_GIB, estimate_memory, estimate_phases,
                                         pass_widths, suggestions)
from coconut_scale.config.model_shape import UnknownModelError, hidden_size, recipe_shape
from coconut_scale.data.records import DataFormatError
from coconut_scale.model.shapes import SHAPES, dims, hf_config, lora_param_count, param_count, shape_for
from coconut_scale.config.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
LLAMA = REPO / "recipes" / "llama8b_gsm.yaml"
LLAMA_LORA = REPO / "recipes" / "llama8b_gsm_lora.yaml"

SMALL_SHAPE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": False}


def small_recipe(**edits):
    data = {
        "name": "small", "gpus_assumed": 1,
        "model": {"name_or_path": "small", "from_config": SMALL_SHAPE, "dtype": "bf16"},
        "data": {"train_file": "t.json", "val_file": "v.json", "max_seq_len": 32},
        "coconut": {"c_thought": 1, "max_latent_stage": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 2},
        "optim": {"lr": 1e-4, "epochs": 1},
        "deepspeed": {"config": "ds_configs/zero0_bf16.json"},
        "lora": {"enabled": False, "rank": 4},
    }
    for dotted, value in edits.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return recipe_from_dict(data)


def test_hand_computed_small_config():
    # Parameters: embeddings 1000*64 and an untied lm_head 1000*64; per layer q 64*64, k and v 64*32
    # (2 kv heads x head_dim 16), o 64*64, gate/up 64*128, down 128*64, two RMSNorms of 64; final norm 64.
    linears = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    per_layer = linears + 2 * 64
    P = 2 * 1000 * 64 + 2 * per_layer + 64
    assert P == 202_048 == param_count(SMALL_SHAPE)

    phases = estimate_phases(small_recipe(), 1)
    B, T, L, h, q, kv, I, V, b = 2, 32, 2, 64, 64, 32, 128, 1000, 2
    # c_thought 1 x max_latent_stage 2: 3 passes over columns [0, 9), [9, 10), [10, 32) (ROW_LAYOUT: the question
    # a quarter of the row, then <|start-latent|>)
    assert pass_widths(small_recipe()) == [9, 1, 22]
    Tl, Te = 22, 10
    # One layer recomputed at the last pass (LAYER_TENSORS for a full Llama at its MLP's backward: 4 h-, 2 q-, 6 I-wide
    # tensors in bf16 and 2 h-wide in fp32), the keys/values repeated to the 4 query heads over T, the mask.
    R = B * Tl * (b * (4 * h + 2 * q + 6 * I) + 4 * 2 * h) + 2 * B * T * q * b + B * Tl * T * (b + 1)
    R_sums = 128 * 64 * b  # the down projection's gradient sum: its backward comes first
    # ... or the layer's end: little left of its activations (LAYER_END_TENSORS), all its weights' sums, and the
    # largest projection's next contribution about to join its sum; the larger of the two
    end, layer_sums, incoming = B * Tl * (b * h + 4 * 6 * h), linears * b, 128 * 64 * b
    if end + incoming + layer_sums > R + R_sums:
        R, R_sums = end + incoming, layer_sums
    top = phases["train"]["moments"]["top"]
    expected = {
        "weights": P * 2,  # bf16, ZeRO-0: not partitioned
        "optimizer": P * 12,  # fp32 master + Adam m + v
        "gathered": 0,  # only ZeRO-3 gathers
        # the recomputed layer's gradient sums, the finished lm_head gradient
        "gradients": R_sums + V * h * b,
        # embeddings, the 2 latent-filled chunks, L - 1 layer outputs of the wide passes' columns, the one-column
        # pass run once (each layer's saved tensors, LAYER_SAVED: 4 h-, 2 q-, 4 I-wide and 2 fp32 h-wide; its
        # attention mask), the final norm's fp32 input of the earlier passes, the recomputed layer
        "activations": B * T * h * b + B * (T - 9) * h * b + (L - 1) * B * (T - 1) * h * b
        + L * B * (b * (4 * h + 2 * q + 4 * I) + 4 * 2 * h) + B * T * (b + 1) + B * Te * h * 4 + R,
        "kv_cache": 2 * L * B * T * kv * b,  # every layer's keys/values of every pass
        "logits": B * T * h * b + B * Tl * h * b,  # the loss's gradient for the hidden states
    }
    for key, value in expected.items():
        assert top[key] == pytest.approx(value / GIB), key
    loss = phases["train"]["moments"]["loss"]
    # the loss in 8 token chunks: one chunk's logits at a time, plus the final hidden states and their flat copy;
    # ZeRO-0 leaves the trainable head whole, so the fused loss holds its gradient in fp32 (V*h*4) and d(hidden)
    # beside a chunk in forward, and a second fp32 copy of d(head) in backward
    chunk = math.ceil(B * (T - 1) / 8) * V * (b + 12)
    assert loss["logits"] == pytest.approx((2 * B * T * h * b + B * T * h * b + max(chunk + V * h * 4, 2 * V * h * 4))
                                           / GIB)
    est = estimate_memory(small_recipe(), 1)
    assert est["phase"] == max(phases, key=lambda k: phases[k]["total"])
    assert est["buffers"] == pytest.approx(P * 4 / GIB)  # one GPU: no bucket; BF16_Optimizer's fp32 gradients
    assert est["overhead"] == OVERHEAD_GIB
    assert est["total"] == pytest.approx(sum(est[k] for k in GPU_COMPONENTS))
    assert est["host_offload"] == 0


def test_param_counts_match_hf_models():
    from transformers import AutoModelForCausalLM

    for shape in [SMALL_SHAPE, *SHAPES.values()]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config(shape))
        assert param_count(shape) == sum(p.numel() for p in model.parameters()), shape.get("model_type")


def test_known_shapes():
    llama = dims(shape_for("meta-llama/Llama-3.1-8B-Instruct"))
    assert (llama.hidden, llama.layers, llama.heads, llama.kv_heads, llama.intermediate, llama.vocab, llama.tied) == \
        (4096, 32, 32, 8, 14336, 128256, False)
    assert shape_for("meta-llama/Llama-3.1-8B")["rope_parameters"]["rope_theta"] == 500000.0
    qwen = dims(shape_for("Qwen/Qwen3-4B-Instruct-2507"))
    assert (qwen.hidden, qwen.layers, qwen.heads, qwen.kv_heads, qwen.head_dim, qwen.intermediate, qwen.vocab, qwen.tied) == \
        (2560, 36, 32, 8, 128, 9728, 151936, True)
    smol = dims(shape_for("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert (smol.hidden, smol.layers, smol.heads, smol.kv_heads, smol.intermediate, smol.vocab, smol.tied) == \
        (576, 30, 9, 3, 1536, 49152, True)
    assert dims(shape_for("openai-community/gpt2")).hidden == 768 and dims(shape_for("gpt2-medium")).layers == 24
    assert shape_for("someone/unknown-model") is None
    assert round(param_count(shape_for("meta-llama/Llama-3.1-8B")) / 1e9, 2) == 8.03
    assert round(param_count(shape_for("Qwen/Qwen3-4B")) / 1e9, 2) == 4.02


def test_local_config_json_is_a_shape(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}')
    assert dims(shape_for(str(tmp_path))).hidden == 32


def test_lora_param_count():
    shape = shape_for("meta-llama/Llama-3.1-8B")
    # rank 64: q, o: 64*(4096+4096); k, v: 64*(4096+1024); gate, up, down: 64*(4096+14336); 32 layers
    per_layer = 2 * 64 * 8192 + 2 * 64 * 5120 + 3 * 64 * 18432
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_param_count(shape, 64, targets) == 32 * per_layer == 167_772_160
    # GPT-2's c_proj is two modules per layer (attention out 768->768, MLP out 3072->768)
    assert lora_param_count(SHAPES["gpt2"], 8, ["c_proj"]) == 12 * 8 * ((768 + 768) + (3072 + 768))
    with pytest.raises(ValueError, match="do not exist in a llama layer"):
        lora_param_count(shape, 8, ["c_attn"])


def test_zero3_states_scale_as_one_over_world_size():
    r = load_recipe(LLAMA)
    sizes = [8, 16, 32, 64]
    ests = {ws: estimate_phases(r, ws)["optimizer step"] for ws in sizes}
    tops = {ws: estimate_phases(r, ws)["train"]["moments"]["top"] for ws in sizes}
    for key in ("weights", "gradients", "optimizer"):
        scaled = [(ests if key == "gradients" else tops)[ws][key] * ws for ws in sizes]
        assert scaled == pytest.approx([scaled[0]] * len(sizes)), key
    # the full model's 16 bytes/param shared by 8 GPUs (the optimizer step: every gradient finished and sharded),
    # plus the step's fp32 copy of the gradients (ZeRO-3: of sub_group_size parameters at a time)
    P = param_count(shape_for("meta-llama/Llama-3.1-8B"))
    copy = 4 * min(P, 1e9 * 8) / 8
    assert (ests[8]["weights"] + ests[8]["gradients"] + ests[8]["optimizer"]) * GIB == pytest.approx(16 * P / 8 + copy)
    # In backward every layer's gradient is summed over the latent passes before ZeRO can shard it: whole on every GPU
    sums = [estimate_phases(r, ws)["train"]["moments"]["bottom"]["gradients"] for ws in sizes]
    assert min(sums) * GIB > 0.8 * 2 * P
    # the recipe keeps the whole model gathered across latent passes: stage3_max_live_parameters 8.1e9 > P, bf16
    assert r.deepspeed.overrides["zero_optimization"]["stage3_max_live_parameters"] >= P
    assert ests[8]["gathered"] == pytest.approx(P * 2 / GIB)


def test_lora_is_far_smaller_than_full_fine_tuning():
    micro16 = "batch.micro_batch_per_world_size={1: 16}"
    full = load_recipe(LLAMA, ["deepspeed.config=ds_configs/zero0_bf16.json", micro16])
    lora = load_recipe(LLAMA_LORA, [micro16])
    f, l = estimate_memory(full, 1), estimate_memory(lora, 1)
    # Same model, micro batch and stage: the base weights match, gradients + Adam shrink ~50x.
    assert l["weights"] == pytest.approx(f["weights"], rel=0.05)
    assert (l["gradients"] + l["optimizer"]) < 0.03 * (f["gradients"] + f["optimizer"])
    assert l["total"] < 0.35 * f["total"]
    # The same keys/values; LoRA's layer keeps more (each adapter's input and output); the full fine-tune's whole
    # trainable head adds the fused loss's fp32 gradient and d(hidden) (V*h*4 + B*T*h*b).
    fm, lm = (estimate_phases(x, 1)["train"]["moments"] for x in (full, lora))
    assert lm["top"]["kv_cache"] == fm["top"]["kv_cache"] and lm["top"]["activations"] > fm["top"]["activations"]
    chunk = math.ceil(16 * 511 / 8) * 128256 * (2 + 12)
    fused = 16 * 512 * 4096 * 2 + max(chunk + 128256 * 4096 * 4, 2 * 128256 * 4096 * 4)
    assert (fm["loss"]["logits"] - lm["loss"]["logits"]) * GIB == pytest.approx(fused - chunk)


def test_passes_checkpointing_attention_and_offload():
    top = lambda r: estimate_phases(r, 1)["train"]["moments"]["top"]["activations"]  # noqa: E731
    base, eager = top(small_recipe(lora__enabled=True)), top(small_recipe(lora__enabled=True,
                                                                        model__attn_implementation="eager"))
    assert (eager - base) * GIB == pytest.approx(2 * 2 * 4 * 22 * 32 * 2)  # B * heads * Tl * T scores and probabilities
    # Without checkpointing, more latent passes cost more (re-materialised past keys/values); with it, more latents
    # only shorten the last pass, whose layer is recomputed.
    train = lambda r: estimate_phases(r, 1)["train"]["activations"]  # noqa: E731
    no_ckpt = [train(small_recipe(model__gradient_checkpointing=False, coconut__max_latent_stage=s)) for s in (1, 3)]
    assert no_ckpt[1] > no_ckpt[0] > train(small_recipe())
    ckpt = [top(small_recipe(coconut__max_latent_stage=s)) for s in (1, 3)]
    assert ckpt[1] <= ckpt[0]
    off = estimate_memory(load_recipe(LLAMA, ["deepspeed.config=ds_configs/zero3_offload_bf16.json"]), 8)
    assert off["weights"] == off["optimizer"] == 0
    assert off["host_offload"] * GIB == pytest.approx(16 * param_count(shape_for("meta-llama/Llama-3.1-8B")) / 8)


def test_suggestions_for_a_recipe_that_does_not_fit():
    r = load_recipe(LLAMA)
    est = estimate_memory(r, 1)
    assert est["total"] > 80
    fixes = suggestions(r, 1, 80, shape_for(r.model.name_or_path))
    assert any("zero3_offload_bf16" in f for f in fixes) and any("lora.enabled=true" in f for f in fixes)


def test_main_fails_and_explains_when_memory_does_not_fit(capsys):
    assert main([str(LLAMA), "--world-sizes", "1", "--no-ds-config"]) == 1
    out = capsys.readouterr().out
    assert "FAIL llama8b_gsm at 1 GPU(s)" in out and "> 80 GiB" in out and "lora.enabled=true" in out
    assert main([str(LLAMA), "--world-sizes", "1", "--no-ds-config",
                 "--set", "deepspeed.config=ds_configs/zero3_offload_bf16.json"]) == 0


def test_main_fails_on_invalid_recipe_and_bad_world_size(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(LLAMA.read_text().replace("  micro_batch_size:", "  micro_batch_sise:"))
    assert main([str(bad)]) == 1
    assert "unknown key 'batch.micro_batch_sise'" in capsys.readouterr().out
    assert main([str(LLAMA), "--world-sizes", "48", "--no-ds-config"]) == 1
    assert "global_batch_size 128 is not divisible" in capsys.readouterr().out


# --- the model-shape lookup (shared with the trainer) ----------------------------------------------------


def test_hidden_size_from_config_known_shapes_and_auto_config(monkeypatch):
    assert hidden_size(small_recipe()) == 64
    assert hidden_size(load_recipe(LLAMA)) == 4096
    gpt2_like = load_recipe(LLAMA, ["model.name_or_path=someone/unknown-model"])
    seen = []

    def from_pretrained(source, **kwargs):
        seen.append((source, kwargs))
        from transformers import GPT2Config

        return GPT2Config(n_embd=48, n_layer=2, n_head=4)

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", from_pretrained)
    assert hidden_size(gpt2_like) == 48 and recipe_shape(gpt2_like)["model_type"] == "gpt2"
    assert seen[0] == ("someone/unknown-model", {})

    def offline(source, **kwargs):
        raise OSError(f"{source} is not a local folder and the hub cannot be reached")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", offline)
    with pytest.raises(UnknownModelError, match=r"unknown architecture for model.name_or_path = "
                                                r"'someone/unknown-model' \(OSError: .*cannot be reached\)"):
        hidden_size(gpt2_like)
    out = []
    assert check_recipe(str(LLAMA), overrides=["model.name_or_path=someone/unknown-model"], out=out.append)
    assert out[-1].startswith("FAIL ") and "unknown architecture" in out[-1]


# --- the LR schedule check prints ------------------------------------------------------------------------


def test_check_prints_the_schedule_from_the_training_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = {"question": "q", "steps": ["s"], "answer": "a"}
    (tmp_path / "t.json").write_text(json.dumps([record] * 20))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LLAMA.read_text())
    overrides = ["data.train_file=t.json", "data.val_file=t.json", "batch.global_batch_size=8",
                 "batch.micro_batch_size=1", "batch.world_sizes=[8]", "optim.scheduler=cosine"]
    out = []
    check_recipe(str(recipe), show_ds_config=False, overrides=overrides, out=out.append)
    line = next(o for o in out if o.startswith("LR schedule"))
    # 20 records // 8 = 2 steps per epoch, x 3 epochs per stage (the recipe resets the optimizer every stage)
    assert line.startswith("LR schedule: cosine, lr 1e-05, warmup 50 step(s), over 6 optimizer steps = 20 records "
                           "// global batch 8 = 2 steps/epoch x 3 epochs from coconut.epochs_per_stage")
    assert "records longer than data.max_seq_len 512 are only dropped at training time" in line
    assert "the LR never gets past the warmup" in line
    (tmp_path / "t.json").write_text(json.dumps([record, {"question": "q", "steps": "s", "answer": "a"}]))
    with pytest.raises(DataFormatError, match=r"t.json.*record 1.*steps"):
        check_recipe(str(recipe), show_ds_config=False, overrides=overrides, out=out.append)


@pytest.mark.slow  # a child process that imports DeepSpeed (10-20 s on 2 busy cores)
def test_check_prints_no_accelerator_guess_from_deepspeed():
    """On a machine without a GPU and without DS_ACCELERATOR, DeepSpeed would warn "Setting accelerator to CPU"
    into the report; the check runs nothing on an accelerator and says nothing of it."""
    import subprocess
    import sys

    from child_process import subprocess_env

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds CUDA here and guesses nothing")
    env = {k: v for k, v in subprocess_env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-m", "coconut_scale", "check", str(REPO / "recipes" / "tiny_cpu.yaml"),
                           "--no-ds-config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1/1 recipe(s) ok" in proc.stdout
    assert "accelerator" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr

"""One-process ZeRO-3 engine steps on a CUDA GPU, through coconut_scale.train.engine.build_engine, with the
fused AdamW the strategy picks on CUDA: full fine-tuning and LoRA, bf16 (ds_configs/zero3_bf16.json)."""

from pathlib import Path

import pytest
import torch

from coconut_scale.config.batch_plan import resolve_batch
from coconut_scale.config.ds_config import build_ds_config
from coconut_scale.config.model_shape import hidden_size
from coconut_scale.config.recipe import load_recipe
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import latent_batch, tiny_tokenizer
from coconut_scale.train.engine import build_engine
from coconut_scale.train.strategy import init_distributed

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu

MICRO = 4
RECIPES = {"full": "tiny_cpu.yaml", "lora": "tiny_cpu_lora.yaml"}


@pytest.fixture
def zero3_engine(request):
    """The engine bundle of a tiny recipe on this GPU; the HF ZeRO-3 context is dropped afterwards."""
    recipe = load_recipe(REPO / "recipes" / RECIPES[request.param], [
        "model.dtype=bf16", "deepspeed.config=ds_configs/zero3_bf16.json", "lora.dropout=0.0",
        f"batch.micro_batch_size={MICRO}", f"batch.global_batch_size={MICRO}", "optim.lr=1.0e-2",
    ])
    init_distributed()
    plan = resolve_batch(recipe.batch, 1, recipe.data.max_seq_len)
    ds_config = build_ds_config(recipe, plan, hidden_size(recipe))
    tokenizer = tiny_tokenizer()
    bundle = build_engine(recipe, ds_config, tokenizer, 10, log=lambda *_: None)
    yield bundle, LatentTokens.from_tokenizer(tokenizer)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    del bundle
    unset_hf_deepspeed_config()
    torch.cuda.empty_cache()


def _innermost(optimizer):
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@pytest.mark.parametrize("zero3_engine", ["full", "lora"], indirect=True)
def test_zero3_engine_steps_with_fused_adamw(zero3_engine):
    bundle, tokens = zero3_engine
    engine = bundle.engine
    assert engine.zero_optimization_stage() == 3
    assert all(group.get("fused") for group in _innermost(engine.optimizer).param_groups)
    ids, mask, labels, pos = (t.cuda() for t in latent_batch(tokens, [6, 6, 4, 0], [9, 5, 7, 8], seed=1))
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=pos)
    passes = bundle.model.count_passes(ids)
    losses = []
    for _ in range(5):
        loss = engine(**batch, num_passes=passes).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert engine.global_steps == 5
    assert losses[-1] < losses[0], losses  # one batch, five steps at lr 1e-2: it must be learnt

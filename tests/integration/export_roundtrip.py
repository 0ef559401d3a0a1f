"""Run by test_train_distributed.py in its own process (it creates a process group).

Builds the ZeRO-3 engine of a resolved recipe, takes two optimizer steps, exports HF format, reloads it with
`from_pretrained`, and prints the largest logit difference between the engine's module and the reload.
"""

import sys
from pathlib import Path

import torch
import yaml

from coconut_scale.config.batch_plan import resolve_batch
from coconut_scale.train.export import export_hf
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.curriculum import build_stage_dataset
from coconut_scale.config.ds_config import build_ds_config
from coconut_scale.train.engine import build_engine
from coconut_scale.train.strategy import init_distributed
from coconut_scale.config.model_shape import hidden_size
from coconut_scale.data.curriculum import CurriculumConfig
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.loading import load_exported
from coconut_scale.config.recipe import recipe_from_dict
from coconut_scale.data.tokenized import load_tokenized
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.train.run_data import recipe_tokenizer


def main(resolved_yaml: str, workdir: str) -> None:
    data = yaml.safe_load(Path(resolved_yaml).read_text())
    data["checkpoint"]["init_from"] = None
    recipe = recipe_from_dict(data, resolved_yaml)
    init_distributed()
    plan = resolve_batch(recipe.batch, 1, recipe.data.max_seq_len)
    ds_config = build_ds_config(recipe, plan, hidden_size(recipe))
    tokenizer = recipe_tokenizer(recipe)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    bundle = build_engine(recipe, ds_config, tokenizer, 10, log=lambda *_: None)
    engine = bundle.engine
    recs, _ = load_tokenized(recipe.data.train_file, tokenizer, recipe.data.max_seq_len, None, 1, 2)
    data = build_stage_dataset(recs[:8], 2, CurriculumConfig.from_recipe(recipe.coconut), tokens)
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    batch = collate([data[i] for i in range(plan.micro_batch_size)])
    for _ in range(2 * plan.grad_accum):
        engine.backward(engine(**batch).loss)
        engine.step()
    out = Path(workdir) / "export"
    export_hf(bundle, tokenizer, out, ExportMeta(c_thought=1, tokens=tokens))
    engine.eval()
    with torch.no_grad():
        ours = engine(**batch, return_logits=True).logits
        # Reload as a user would, outside ZeRO-3: drop the live HfDeepSpeedConfig first, or transformers
        # would partition the reloaded model as well.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        bundle.hf_ds_config = None
        unset_hf_deepspeed_config()
        reloaded, _, _ = load_exported(out)
        theirs = reloaded(**batch, return_logits=True).logits
    print("MAX_ABS_DIFF", float((ours - theirs).abs().max()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""HF-format exports of a training run: `<output_dir>/hf/<name>/`, loadable with `from_pretrained`.

An export holds the consolidated 16-bit weights (gathered on all ranks, written by rank 0), the tokenizer with
the Coconut tokens and coconut_config.json (model/export_meta.py owns it). LoRA runs export the adapter merged
into the base, plus the unmerged adapter in `<name>/adapter/` (see model/lora.py). Written under a `.tmp-` name
and renamed, so a reader never sees a half-written export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from coconut_scale import distributed as dist
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.step_supervision import split_decoder_state, write_decoder_export

BASE_PREFIX = "base_causallm."  # the Coconut wrapper's name for the HF model


def export_hf(strategy, tokenizer, out_dir: str | Path, meta: ExportMeta, to_base=None,
              export_step_decoder: bool = False, step_prompt: str | None = None) -> Path | None:
    """Write an HF-format export of the strategy's Coconut model. Collective; rank 0 writes.

    `to_base(state_dict) -> (model, state_dict)` turns the wrapper's state into an HF model to save
    (identity for full fine-tuning; merges adapters for LoRA). A `to_base` with a
    `write_extras(state_dict, directory, tokenizer)` method also gets the unmerged state to write beside
    the model (LoRA: the adapter in `<out_dir>/adapter/`).

    A step-supervised model's decoder (`step_decoder.*` keys) is training-only and left out; with
    `export_step_decoder` it is written beside the model, in `<out_dir>/step_decoder/` (model/step_supervision.py).
    """
    out_dir = Path(out_dir)
    state = strategy.consolidated_state_dict()
    if dist.is_main():
        state, decoder_state = split_decoder_state(state)
        state = {k[len(BASE_PREFIX):] if k.startswith(BASE_PREFIX) else k: v for k, v in state.items()}
        base = strategy.model.base_causallm
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if export_step_decoder and hasattr(strategy.model, "step_decoder"):
            write_decoder_export(strategy.model, decoder_state, tmp, step_prompt)
        write_extras = getattr(to_base, "write_extras", None)
        if write_extras is not None:
            write_extras(state, tmp, tokenizer)
        if to_base is not None:
            base, state = to_base(state)
        base.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        meta.write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    dist.barrier()
    return out_dir if dist.is_main() else None

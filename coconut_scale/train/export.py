"""HF-format exports of a training run: `<output_dir>/hf/<name>/`, loadable with `from_pretrained`.

An export holds the consolidated weights (gathered on all ranks, written by rank 0) in the dtype the recipe trains
in (model.dtype: bf16 for the GPU recipes, fp32 for the CPU ones; checkpoint.export_dtype chooses another), the
tokenizer with the Coconut tokens and coconut_config.json (model/export_meta.py owns it). LoRA runs export the adapter merged
into the base, plus the unmerged adapter in `<name>/adapter/` (see model/lora.py). A step-supervised run's decoder
is training-only and left out, unless asked for: then it is written beside the model as a plain HF model (adapters
merged), `<name>/step_decoder/`, with step_supervision.json. Written under a `.tmp-` name and renamed
(atomic_files.atomic_dir), so a reader never sees a half-written export; manifest.json (every file's size and
digest, file_manifest.py) is written last and verified by every command that opens the export. A write the
filesystem refuses stops every rank with one line naming the file, the errno and the free space.

`point_export` makes one export name another's directory: `hf/best` is a relative symbolic link to `stageK` when the
best epoch is the one that wrote `stageK` (the same weights, not a second copy on disk); the operating system
follows it for every reader (from_pretrained, load_exported, eval and the analyses).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import atomic_dir, atomic_symlink, write_json_atomic
from coconut_scale.file_manifest import write_manifest_here
from coconut_scale.model.codi import CodiPart
from coconut_scale.model.export_meta import CODI_PROJECTION, STEP_DECODER_DIR, ExportMeta, StepDecoderMeta
from coconut_scale.model.lora import LoraExport, merged_plain_model
from coconut_scale.model.step_supervision import StepSupervision
from coconut_scale.train import storage

BASE_PREFIX = "base_causallm."  # the Coconut wrapper's name for the HF model
DECODER_PREFIX = StepSupervision.name + ".decoder."  # the step decoder's keys in the wrapper's state dict


def split_codi_state(state: dict) -> tuple[dict, dict]:
    """A wrapper state dict -> (the other keys, the CODI part's keys without the wrapper's prefix)."""
    prefix = CodiPart.name + "."
    return ({k: v for k, v in state.items() if not k.startswith(prefix)},
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def split_decoder_state(state: dict) -> tuple[dict, dict]:
    """A wrapper state dict -> (the Coconut's own keys, the step decoder's keys without the wrapper's prefix)."""
    own = {k: v for k, v in state.items() if not k.startswith(StepSupervision.name + ".")}
    decoder = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    return own, decoder


def write_step_decoder(model, decoder_state: dict, directory: str | Path, meta: StepDecoderMeta) -> None:
    """`<directory>/step_decoder/`: the decoder as a plain HF model (adapters merged) and its StepDecoderMeta.
    Rank 0, with the consolidated state. A shared decoder writes only the meta (the export itself decodes)."""
    part = model.part(StepSupervision.name)
    out = Path(directory) / STEP_DECODER_DIR
    out.mkdir(parents=True, exist_ok=True)
    if part.decoder is not None:
        hf_model, state = merged_plain_model(part.decoder, decoder_state)
        hf_model.save_pretrained(str(out), state_dict=state)
    meta.write(directory)


def in_dtype(state: dict, dtype: torch.dtype) -> dict:
    """`state` with every floating tensor in `dtype` (integer buffers as they are)."""
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}


def export_hf(strategy, tokenizer, out_dir: str | Path, meta: ExportMeta, lora: bool = False,
              step_decoder: StepDecoderMeta | None = None, dtype: torch.dtype = torch.float32) -> Path | None:
    """Write an HF-format export of the strategy's Coconut model. Collective; rank 0 writes.

    `lora`: the model's base is a LoRA model; the export is the adapter merged into the base, and the adapter
    itself in `<out_dir>/adapter/`. `step_decoder`: write the step decoder beside the model, with this meta.
    `dtype`: of the exported model's weights (and the decoder's); the adapter keeps its own.
    """
    out_dir = Path(out_dir)
    state = strategy.consolidated_state_dict()
    error = None
    if dist.is_main():
        try:
            _write_export(strategy.model, state, tokenizer, out_dir, meta, lora, step_decoder, dtype)
        except Exception as e:  # noqa: BLE001 - the other ranks wait below: they must hear of it
            error = e
    dist.barrier()
    kept = f"the previous {out_dir} is untouched" if out_dir.exists() else f"{out_dir} was not written"
    storage.agree(error, "export", out_dir.with_name(f".tmp-{out_dir.name}"),
                  lambda: f"the partial .tmp-{out_dir.name} was removed and {kept}")
    return out_dir if dist.is_main() else None


def point_export(link: str | Path, target: str | Path) -> Path | None:
    """Make export `link` (e.g. hf/best) name export `target` (e.g. hf/stage0, a sibling), replacing what `link`
    was. Collective; rank 0 writes."""
    link, error = Path(link), None
    if dist.is_main():
        try:
            atomic_symlink(link, Path(target).name)
        except Exception as e:  # noqa: BLE001 - the other ranks wait below: they must hear of it
            error = e
    dist.barrier()
    storage.agree(error, "export", link, lambda: f"{link} may be missing; the next run writes it again")
    return link if dist.is_main() else None


def _write_export(model, state, tokenizer, out_dir: Path, meta: ExportMeta, lora: bool,
                  step_decoder: StepDecoderMeta | None, dtype: torch.dtype) -> None:
    """Rank 0, with the consolidated state: the export, its manifest last (train/../file_manifest.py)."""
    state, decoder_state = split_decoder_state(state)
    state, codi_state = split_codi_state(state)
    state = {k[len(BASE_PREFIX):] if k.startswith(BASE_PREFIX) else k: v for k, v in state.items()}
    base = model.base_causallm
    with atomic_dir(out_dir) as tmp:
        if step_decoder is not None and model.part(StepSupervision.name) is not None:
            write_step_decoder(model, in_dtype(decoder_state, dtype), tmp, step_decoder)
        if lora:
            lora_export = LoraExport(model)
            lora_export.write_extras(state, tmp, tokenizer)
            base, state = lora_export(state)
        _save_in_dtype(base, in_dtype(state, dtype), tmp, dtype)
        if codi_state:  # method codi: the projection beside the HF model (model/loading.py attach_codi reads it)
            from safetensors.torch import save_file

            codi_state = in_dtype(codi_state, dtype)
            save_file({k: v.detach().cpu().contiguous() for k, v in codi_state.items()}, str(tmp / CODI_PROJECTION))
        tokenizer.save_pretrained(str(tmp))
        meta.write(tmp)
        write_manifest_here(tmp)  # read back from disk: what the export holds is what eval will verify


def _save_in_dtype(base, state: dict, directory: Path, dtype: torch.dtype) -> None:
    """save_pretrained of `state`, with config.json's dtype saying what the weights are: transformers writes the live
    model's dtype there, which `state` need not have."""
    base.save_pretrained(str(directory), state_dict=state)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json_atomic(directory / "config.json", config)

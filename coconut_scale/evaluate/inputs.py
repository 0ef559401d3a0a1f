"""From a checkpoint directory and a data file to evaluation examples, the way training evaluates.

A checkpoint is an HF export written by training (`runs/<name>/hf/{stage0,...,best}/`) or by
`loading.save_exported`: HF weights, the tokenizer with the Coconut tokens and coconut_config.json, which
model.export_meta.ExportMeta reads and validates. The prompts come from data.curriculum.build_eval_examples with
the export's curriculum (CurriculumConfig.from_export), the builder training's end-of-epoch evaluation uses, so
the CLI reproduces the accuracy logged during training.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from coconut_scale import distributed as dist
from coconut_scale.data.curriculum import CurriculumConfig, build_eval_examples
from coconut_scale.data.records import load_records
from coconut_scale.evaluate.runtime import InputError, quiet_libraries, say
from coconut_scale.model.export_meta import COCONUT_CONFIG, ExportMeta
from coconut_scale.model.tokens import LatentTokens


@dataclass
class EvalInputs:
    model: object  # Coconut, on this rank's device, in eval mode
    tokenizer: object
    config: dict  # coconut_config.json as ExportMeta reads it (ExportMeta.to_dict: defaults filled in)
    curriculum: CurriculumConfig
    tokens: LatentTokens
    stage: int
    examples: list[dict]  # generation prompts with the gold answer/steps (data.curriculum.build_eval_examples)
    records: list[dict] = field(default_factory=list)  # the raw records of `examples`, same order (graph fields)
    checkpoint: Path = Path()
    data: Path = Path()
    n_dropped: int = 0  # records longer than --max-seq-len


def read_export_meta(checkpoint: str | Path) -> ExportMeta:
    """The export's coconut_config.json, validated; errors name the directory, the file and the field."""
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise InputError(f"checkpoint {path} is not a directory (expected an HF export such as runs/<name>/hf/best)")
    meta = ExportMeta.read(path)
    if not (path / "config.json").exists():
        raise InputError(f"{path / 'config.json'} not found: {path} holds no HF model")
    from coconut_scale.model.loading import verify_export

    verify_export(path, log=say)  # every file against the export's manifest, before any flag or data is looked at
    return meta


def resolve_stage(requested: int | None, meta: ExportMeta, checkpoint: Path) -> int:
    """The stage to evaluate: the one the checkpoint was exported at unless asked otherwise.

    Past max_latent_stage a stage adds no latents (every later stage is the same prompt), so a larger --stage
    is a mistake; the checkpoint's own stage is always allowed (a run may train past max_latent_stage, as the
    official GSM8K recipe does, and then evaluates with every step dropped from the gold CoT).
    """
    if requested is None:
        return meta.stage
    if requested < 0:
        raise InputError(f"--stage must be >= 0, got {requested}")
    if requested > max(meta.max_latent_stage, meta.stage):
        raise InputError(f"--stage {requested} is larger than max_latent_stage={meta.max_latent_stage} in "
                         f"{Path(checkpoint) / COCONUT_CONFIG} (the checkpoint was trained at stage {meta.stage})")
    return requested


def load_inputs(checkpoint: str | Path, data: str | Path, stage: int | None = None, max_examples: int | None = None,
                max_seq_len: int | None = None, dtype: str = "fp32") -> EvalInputs:
    """Validate everything cheap first (config, stage, data file), then load the model on this rank's device."""
    from coconut_scale.model.loading import load_exported
    from coconut_scale.data.tokenized import load_tokenized

    checkpoint, data = Path(checkpoint), Path(data)
    meta = read_export_meta(checkpoint)
    stage = resolve_stage(stage, meta, checkpoint)
    curriculum = CurriculumConfig.from_export(meta)
    if max_examples is not None and max_examples < 1:
        raise InputError(f"--max-examples must be >= 1, got {max_examples}")
    raw = load_records(data)  # a bad record fails here, naming the file, the record index and the field
    if not raw:
        raise InputError(f"{data}: no records")
    model, tokenizer, _ = load_exported(checkpoint, dtype=dtype, verified=True)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    tokenized, n_dropped = load_tokenized(data, tokenizer, max_seq_len, None, curriculum.c_thought,
                                          curriculum.max_latent_stage)
    if max_examples is not None:
        tokenized = tokenized[:max_examples]
    if not tokenized:
        raise InputError(f"{data}: no record fits --max-seq-len {max_seq_len}")
    # pause_as_thought checkpoints were trained with latents as plain tokens: evaluate them that way too.
    model.feedback = curriculum.latent_feedback
    model.to(dist.device()).eval()
    if meta.method == "codi":
        return _codi_inputs(model, tokenizer, meta, raw[:max_examples] if max_examples else raw, checkpoint, data)
    return EvalInputs(model=model, tokenizer=tokenizer, config=meta.to_dict(), curriculum=curriculum, tokens=tokens,
                      stage=stage, examples=build_eval_examples(tokenized, stage, curriculum, tokens),
                      records=[raw[r["idx"]] for r in tokenized], checkpoint=checkpoint, data=data,
                      n_dropped=n_dropped)


def _codi_inputs(model, tokenizer, meta: ExportMeta, raw: list[dict], checkpoint: Path, data: Path) -> EvalInputs:
    """A `method: codi` export: their test.py's prompts (question, bot, num_latent latents, eot) under the data
    rules it was trained with; records CODI's filters drop are counted in n_dropped."""
    from coconut_scale.data.codi_features import codi_data_options, codi_eval_examples

    tokens = LatentTokens.from_tokenizer(tokenizer)
    n = meta.codi["num_latent"]
    examples = codi_eval_examples(raw, tokenizer, tokens, n, codi_data_options(meta.codi), source=str(data))
    if not examples:
        raise InputError(f"{data}: no record is left after CODI's filters (codi.max_token_num, numeric answers)")
    curriculum = CurriculumConfig.from_export(meta)
    return EvalInputs(model=model, tokenizer=tokenizer, config=meta.to_dict(), curriculum=curriculum, tokens=tokens,
                      stage=meta.stage, examples=examples, records=[raw[e["idx"]] for e in examples],
                      checkpoint=checkpoint, data=data, n_dropped=len(raw) - len(examples))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every checkpoint-evaluating CLI takes (eval and the analyses)."""
    parser.add_argument("checkpoint", help="HF export directory, e.g. runs/demo_cpu/hf/stage2")
    parser.add_argument("data", help="question/steps/answer records (JSON array or JSON Lines)")
    parser.add_argument("--stage", type=int, default=None,
                        help="curriculum stage of the prompts (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per generation batch, per rank")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per example")
    parser.add_argument("--max-seq-len", type=int, default=None, help="drop records longer than this (as training)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--out", default=None, help="output directory")


def check_common_args(args) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def default_out_dir(checkpoint: str | Path, tool: str, stage: int) -> Path:
    """runs/<name>/hf/best -> runs/<name>/eval/best/<tool>-stage<K>; elsewhere <checkpoint>-eval/<tool>-stage<K>.

    Never inside the export itself: re-exporting a stage replaces that directory wholesale.
    """
    ckpt = Path(os.path.abspath(checkpoint))  # not resolve(): hf/best may be a link to hf/stageK, and keeps its name
    base = ckpt.parent.parent / "eval" / ckpt.name if ckpt.parent.name == "hf" else ckpt.with_name(ckpt.name + "-eval")
    return base / f"{tool}-stage{stage}"


def open_inputs(args, tool: str) -> tuple[EvalInputs, Path]:
    """What every export-evaluating command does once its own flags are checked: quiet the libraries, join the
    launcher's process group (if any), load the export and the data, and pick the output directory."""
    quiet_libraries()
    dist.init_for_inference()
    inputs = load_inputs(args.checkpoint, args.data, args.stage, args.max_examples, args.max_seq_len, args.dtype)
    return inputs, Path(args.out) if args.out else default_out_dir(inputs.checkpoint, tool, inputs.stage)

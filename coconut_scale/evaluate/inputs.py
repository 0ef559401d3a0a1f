"""From a checkpoint directory and a data file to evaluation examples, the way training evaluates.

A checkpoint is an HF export written by training (`runs/<name>/hf/{stage0,...,best}/`) or by
`loading.save_exported`: HF weights, the tokenizer with the Coconut tokens and coconut_config.json (c_thought,
stage, max_latent_stage, mode, pad_latent_to_max, token ids). Examples are built exactly as train.py's end-of-
epoch evaluation builds them (build_eval_example + the number of steps the stage drops, for the gold CoT), so
the CLI reproduces the accuracy logged during training.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from coconut_scale import distributed as dist
from coconut_scale.evaluate.runtime import InputError
from coconut_scale.data.curriculum import MODES, CurriculumConfig, build_eval_example, train_layout
from coconut_scale.model.loading import COCONUT_CONFIG
from coconut_scale.data.records import load_records
from coconut_scale.model.tokens import LatentTokens

REQUIRED_CONFIG_KEYS = ("c_thought", "latent_id", "start_id", "end_id", "eos_id")


@dataclass
class EvalInputs:
    model: object  # Coconut, on this rank's device, in eval mode
    tokenizer: object
    config: dict  # coconut_config.json
    curriculum: CurriculumConfig
    tokens: LatentTokens
    stage: int
    examples: list[dict]  # generation prompts with the gold answer/steps (see eval_examples)
    records: list[dict] = field(default_factory=list)  # the raw records of `examples`, same order (graph fields)
    checkpoint: Path = Path()
    data: Path = Path()
    n_dropped: int = 0  # records longer than --max-seq-len


def read_checkpoint_config(checkpoint: str | Path) -> dict:
    """coconut_config.json of an export, validated; errors name the directory, the file and the field."""
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise InputError(f"checkpoint {path} is not a directory (expected an HF export such as runs/<name>/hf/best)")
    cfg_path = path / COCONUT_CONFIG
    if not cfg_path.exists():
        raise InputError(f"{cfg_path} not found: {path} is not a coconut_scale export (runs/<name>/hf/<stage>/)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: expected a JSON object")
    for key in REQUIRED_CONFIG_KEYS:
        if not isinstance(cfg.get(key), int):
            raise InputError(f"{cfg_path}: field {key!r} missing or not an integer")
    if cfg.get("mode", "coconut") not in MODES:
        raise InputError(f"{cfg_path}: field 'mode' is {cfg.get('mode')!r}, expected one of {MODES}")
    for key in ("stage", "max_latent_stage"):
        if key in cfg and (not isinstance(cfg[key], int) or cfg[key] < 0):
            raise InputError(f"{cfg_path}: field {key!r} must be a non-negative integer, got {cfg[key]!r}")
    if not (path / "config.json").exists():
        raise InputError(f"{path / 'config.json'} not found: {path} holds no HF model")
    return cfg


def curriculum_of(cfg: dict) -> CurriculumConfig:
    """The evaluation-relevant part of the training curriculum (older exports lack some keys: defaults)."""
    return CurriculumConfig(mode=cfg.get("mode", "coconut"), c_thought=cfg["c_thought"],
                            max_latent_stage=cfg.get("max_latent_stage", cfg.get("stage", 0)),
                            pad_latent_to_max=bool(cfg.get("pad_latent_to_max", False)))


def resolve_stage(requested: int | None, cfg: dict, checkpoint: Path) -> int:
    """The stage to evaluate: the one the checkpoint was exported at unless asked otherwise.

    Past max_latent_stage a stage adds no latents (every later stage is the same prompt), so a larger --stage
    is a mistake; the checkpoint's own stage is always allowed (a run may train past max_latent_stage, as the
    official GSM8K recipe does, and then evaluates with every step dropped from the gold CoT).
    """
    trained = int(cfg.get("stage", 0))
    if requested is None:
        return trained
    if requested < 0:
        raise InputError(f"--stage must be >= 0, got {requested}")
    max_stage = int(cfg.get("max_latent_stage", trained))
    if requested > max(max_stage, trained):
        raise InputError(f"--stage {requested} is larger than max_latent_stage={max_stage} in "
                         f"{Path(checkpoint) / COCONUT_CONFIG} (the checkpoint was trained at stage {trained})")
    return requested


def eval_examples(tokenized: list[dict], stage: int, curriculum: CurriculumConfig, tokens: LatentTokens) -> list[dict]:
    """Generation prompts at `stage`, as train.py builds them (n_skipped_steps sets the gold CoT)."""
    examples = []
    for rec in tokenized:
        ex = build_eval_example(rec, stage, curriculum, tokens)
        ex["n_skipped_steps"] = train_layout(len(rec["steps_ids"]), stage, curriculum)[0]
        ex["steps_ids"] = rec["steps_ids"]
        examples.append(ex)
    return examples


def load_inputs(checkpoint: str | Path, data: str | Path, stage: int | None = None, max_examples: int | None = None,
                max_seq_len: int | None = None, dtype: str = "fp32") -> EvalInputs:
    """Validate everything cheap first (config, stage, data file), then load the model on this rank's device."""
    from coconut_scale.model.loading import load_exported
    from coconut_scale.data.tokenized import load_tokenized

    checkpoint, data = Path(checkpoint), Path(data)
    cfg = read_checkpoint_config(checkpoint)
    stage = resolve_stage(stage, cfg, checkpoint)
    curriculum = curriculum_of(cfg)
    if max_examples is not None and max_examples < 1:
        raise InputError(f"--max-examples must be >= 1, got {max_examples}")
    raw = load_records(data)  # a bad record fails here, naming the file, the record index and the field
    if not raw:
        raise InputError(f"{data}: no records")
    model, tokenizer, cfg = load_exported(checkpoint, dtype=dtype)
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
    return EvalInputs(model=model, tokenizer=tokenizer, config=cfg, curriculum=curriculum, tokens=tokens, stage=stage,
                      examples=eval_examples(tokenized, stage, curriculum, tokens),
                      records=[raw[r["idx"]] for r in tokenized], checkpoint=checkpoint, data=data,
                      n_dropped=n_dropped)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every checkpoint-evaluating CLI takes (eval and the analyses)."""
    parser.add_argument("checkpoint", help="HF export directory, e.g. runs/demo_cpu/hf/best")
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
    ckpt = Path(checkpoint).resolve()
    base = ckpt.parent.parent / "eval" / ckpt.name if ckpt.parent.name == "hf" else ckpt.with_name(ckpt.name + "-eval")
    return base / f"{tool}-stage{stage}"

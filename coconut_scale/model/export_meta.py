"""The metadata files of an HF export, and their one owner: what an export needs beside the weights to be evaluated
as it was trained.

`coconut_config.json` (`ExportMeta`): training's export and `save_exported` write it; eval, the analyses and
`load_exported` read it back through `ExportMeta.read`, which checks every field and names the file and the field
when one is wrong. The file is flat JSON: the known fields below, plus whatever metrics the trainer had at export
time (epoch, accuracy, val_loss, ...), kept in `metrics`.

`step_decoder/step_supervision.json` (`StepDecoderMeta`): how an exported SIM-CoT step decoder was trained, beside
its weights in `step_decoder/` (written only when a recipe asks for the decoder).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from coconut_scale.errors import UserError
from coconut_scale.model.modes import MODES
from coconut_scale.model.tokens import LatentTokens

COCONUT_CONFIG = "coconut_config.json"
STEP_DECODER_DIR = "step_decoder"  # <export>/step_decoder/: the decoder as a plain HF model + STEP_CONFIG
STEP_CONFIG = "step_supervision.json"
CODI_PROJECTION = "codi_projection.safetensors"  # method codi: the projection's weights beside the HF model
METHODS = ("coconut", "codi")
_TOKEN_FIELDS = ("start_id", "latent_id", "end_id", "eos_id", "pad_id")


class ExportFormatError(UserError):
    """A directory that is not a readable coconut_scale export; the message names the file and field."""



def _json_object(path: Path) -> dict:
    """The JSON object in `path`, or ExportFormatError naming the file and what is wrong with it."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ExportFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw

@dataclass(frozen=True)
class ExportMeta:
    c_thought: int  # latent thoughts per replaced reasoning step
    tokens: LatentTokens
    stage: int = 0  # curriculum stage the weights were exported at
    mode: str = "coconut"
    max_latent_stage: int = 0
    pad_latent_to_max: bool = False
    no_thoughts_markers: bool = True  # no_thoughts mode: keep <|start-latent|><|end-latent|> (see curriculum)
    metrics: dict = field(default_factory=dict)  # epoch, accuracy, val_loss, ... at export time
    method: str = "coconut"  # the training method that made the weights (coconut | codi)
    # method codi: the recipe's codi section (projection, num_latent, data rules), read back by load_exported
    codi: dict | None = None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("tokens", "metrics")}
        if out["codi"] is None:
            del out["codi"]
        return {**self.metrics, **out, **asdict(self.tokens)}

    def write(self, directory: str | Path) -> Path:
        from coconut_scale.atomic_files import write_json_atomic

        return write_json_atomic(Path(directory) / COCONUT_CONFIG, self.to_dict())

    @classmethod
    def read(cls, directory: str | Path) -> "ExportMeta":
        path = Path(directory) / COCONUT_CONFIG
        if not path.exists():
            raise ExportFormatError(f"{path} not found: {directory} is not a coconut_scale export "
                                    f"(runs/<name>/hf/<stage>/)")
        raw = _json_object(path)
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = COCONUT_CONFIG) -> "ExportMeta":
        def integer(key, default=None, minimum=0):
            value = raw.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                what = "missing or not an integer" if key not in raw else f"must be an integer >= {minimum}, got {value!r}"
                raise ExportFormatError(f"{source}: field {key!r} {what}")
            return value

        c_thought = integer("c_thought", minimum=1)
        ids = {k: integer(k) for k in ("latent_id", "start_id", "end_id", "eos_id")}
        ids["pad_id"] = integer("pad_id", ids["eos_id"])  # exports before pad_id was recorded padded with EOS
        mode = raw.get("mode", "coconut")
        if mode not in MODES:
            raise ExportFormatError(f"{source}: field 'mode' is {mode!r}, expected one of {MODES}")
        stage = integer("stage", 0)
        method = raw.get("method", "coconut")  # exports before the field were all Coconut's
        if method not in METHODS:
            raise ExportFormatError(f"{source}: field 'method' is {method!r}, expected one of {METHODS}")
        codi = raw.get("codi")
        if method == "codi" and not (isinstance(codi, dict) and isinstance(codi.get("num_latent"), int)):
            raise ExportFormatError(f"{source}: field 'codi' must be an object with an integer num_latent when "
                                    f"method is 'codi', got {codi!r}")
        known = {f.name for f in fields(cls)} | set(_TOKEN_FIELDS)
        return cls(c_thought=c_thought, tokens=LatentTokens(**ids), stage=stage, mode=mode,
                   max_latent_stage=integer("max_latent_stage", stage),
                   pad_latent_to_max=bool(raw.get("pad_latent_to_max", False)),
                   no_thoughts_markers=bool(raw.get("no_thoughts_markers", True)),
                   metrics={k: v for k, v in raw.items() if k not in known}, method=method,
                   codi=codi if method == "codi" else None)


@dataclass(frozen=True)
class StepDecoderMeta:
    c_thought: int  # latents per decoded step
    weight: float  # the step loss's weight in training
    prompt: str | None  # the text before each step's thoughts ("{k}" = the 1-based step), None: none
    shared: bool  # the base model decoded (no separate decoder weights in step_decoder/)

    def write(self, export_dir: str | Path) -> Path:
        from coconut_scale.atomic_files import write_json_atomic

        return write_json_atomic(Path(export_dir) / STEP_DECODER_DIR / STEP_CONFIG, asdict(self))

    @classmethod
    def read(cls, export_dir: str | Path) -> "StepDecoderMeta":
        path = Path(export_dir) / STEP_DECODER_DIR / STEP_CONFIG
        if not path.is_file():
            raise ExportFormatError(f"{path} not found: {export_dir} was exported without its step decoder "
                                    f"(train with coconut.step_supervision.export_decoder: true)")
        raw = _json_object(path)
        c_thought = raw.get("c_thought")
        if not isinstance(c_thought, int) or isinstance(c_thought, bool) or c_thought < 1:
            raise ExportFormatError(f"{path}: field 'c_thought' must be an integer >= 1, got {c_thought!r}")
        weight = raw.get("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ExportFormatError(f"{path}: field 'weight' must be a number, got {weight!r}")
        prompt = raw.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ExportFormatError(f"{path}: field 'prompt' must be a string or null, got {prompt!r}")
        shared = raw.get("shared")
        if not isinstance(shared, bool):
            raise ExportFormatError(f"{path}: field 'shared' must be true or false, got {shared!r}")
        return cls(c_thought=c_thought, weight=float(weight), prompt=prompt, shared=shared)

"""The recipe: one YAML file that fully describes a run, validated before anything expensive starts.

    recipe = load_recipe("recipes/llama8b_gsm.yaml", ["optim.lr=2e-5", "batch.micro_batch_size=4"])

Every section forbids unknown keys, so a typo fails at launch with the full dotted key, the file and the
closest valid spelling instead of silently training with a default. Command-line overrides are a dotlist
(`section.key=value`, the value parsed as YAML) checked against the same schema before validation.

Data files and checkpoints are opened relative to the current directory. The DeepSpeed JSON is looked up in
the current directory, then the repository checkout (when running from one), then the package itself, which
ships the templates as coconut_scale/ds_configs/: `ds_configs/zero3_bf16.json` works from a checkout and from
an installed package, in any cwd.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from coconut_scale.config.schedule import SCHEDULERS
from coconut_scale.errors import UserError
from coconut_scale.model.modes import MODES
from coconut_scale.model.shapes import default_lora_targets

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # coconut_scale/, which holds ds_configs/
REPO_ROOT = PACKAGE_DIR.parent  # a checkout when it has pyproject.toml; site-packages when installed

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")  # checkpoint.on_signal may name these
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]

class RecipeError(UserError):
    """An invalid recipe; `problems` holds one line per problem (the message lists them all)."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def search_roots() -> list[Path]:
    """Where a relative DeepSpeed JSON path is looked up, in order: the cwd, the checkout, the package."""
    checkout = [REPO_ROOT] if (REPO_ROOT / "pyproject.toml").is_file() else []
    return [Path.cwd(), *checkout, PACKAGE_DIR]


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones against the first of search_roots() that has them; else the cwd."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in search_roots():
        if (base / p).exists():
            return base / p
    return Path.cwd() / p


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


BPE_PREFIX = "train-bpe"  # model.tokenizer: train-bpe[:N]
DEFAULT_BPE_VOCAB = 512
MIN_BPE_VOCAB = 257


class ModelCfg(_Section):
    # Hub id or local directory. With from_config it is only a label (run names, logs).
    name_or_path: str = Field(min_length=1)
    gguf_file: str | None = None  # a GGUF inside name_or_path, dequantised by transformers on load
    # Random-init model from these HF config kwargs (must include model_type); tiny test recipes, benchmarks.
    from_config: dict[str, Any] | None = None
    # Hub id or dir; default name_or_path. "train-bpe:N": a byte-level BPE of N tokens fit on data.train_file
    # (models built with from_config, which have no tokenizer of their own); a bare "train-bpe" fits 512.
    tokenizer: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = True
    init_text: str = Field("<<", min_length=1)  # the new Coconut tokens start from this text's embedding

    @property
    def bpe_vocab_size(self) -> int | None:
        """N of `tokenizer: train-bpe:N` (512 for a bare `train-bpe`); None for any other tokenizer."""
        tok = self.tokenizer or ""
        if tok != BPE_PREFIX and not tok.startswith(BPE_PREFIX + ":"):
            return None
        _, _, n = tok.partition(":")
        return int(n) if n else DEFAULT_BPE_VOCAB

    @model_validator(mode="after")
    def _check(self):
        tok = self.tokenizer or ""
        if tok.startswith(BPE_PREFIX + ":"):
            n = tok.partition(":")[2]
            if not n.isdigit() or int(n) < MIN_BPE_VOCAB:
                raise ValueError(f"model.tokenizer {tok!r}: N of train-bpe:N must be an integer >= {MIN_BPE_VOCAB} "
                                 f"(the 256 bytes and the end-of-text token), got {n!r}")
        if self.from_config is not None:
            if not isinstance(self.from_config.get("model_type"), str):
                raise ValueError(f"model.from_config needs a model_type string (e.g. llama), "
                                 f"got keys {sorted(self.from_config)}")
            if self.gguf_file:
                raise ValueError(f"model.gguf_file {self.gguf_file!r} and model.from_config are exclusive: "
                                 "from_config builds random weights, a GGUF loads trained ones")
        return self


class LoraCfg(_Section):
    enabled: bool = False
    rank: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, min_length=1)  # None: default_lora_targets(model_type)


class ProsQASyntheticCfg(_Section):
    """`data.generate: {kind: prosqa_synthetic, ...}`: the built-in ProsQA-style generator (data/prosqa_synthetic.py;
    the defaults below are its own). Both splits come from one seed, with no question shared."""

    kind: Literal["prosqa_synthetic"]
    n_train: PositiveInt = 2000
    n_val: PositiveInt = 200
    seed: NonNegativeInt = 0
    n_concepts: PositiveInt = 10  # made-up concepts per problem
    min_depth: PositiveInt = 2  # fewest proof steps
    max_depth: PositiveInt = 4  # most proof steps
    n_people: Annotated[int, Field(ge=2)] = 2  # the asked person and at least one who reaches the wrong option
    extra_edges: float = Field(1.0, ge=0.0)  # distractor edges per concept
    n_names: PositiveInt | None = None  # size of the concept-word pool (None: all of it)

    @model_validator(mode="after")
    def _depths(self):
        if self.min_depth > self.max_depth:
            raise ValueError(f"data.generate: min_depth {self.min_depth} > max_depth {self.max_depth}")
        if self.n_concepts < 2 * self.max_depth:
            raise ValueError(f"data.generate: n_concepts {self.n_concepts} cannot hold two proof chains of "
                             f"max_depth {self.max_depth} (needs at least {2 * self.max_depth})")
        return self

    def generator_options(self) -> dict[str, Any]:
        """The generator's keyword arguments (everything but the split sizes and the seed)."""
        return self.model_dump(exclude={"kind", "n_train", "n_val", "seed"})


class ArithmeticSyntheticCfg(_Section):
    """`data.generate: {kind: arithmetic_synthetic, ...}`: GSM8k-Aug-style word problems with iCoT steps
    (data/arithmetic_synthetic.py), numeric answers as CODI needs them."""

    kind: Literal["arithmetic_synthetic"]
    n_train: PositiveInt = 2000
    n_val: PositiveInt = 200
    seed: NonNegativeInt = 0
    min_steps: PositiveInt = 2
    max_steps: PositiveInt = 3
    max_value: Annotated[int, Field(ge=10)] = 100

    @model_validator(mode="after")
    def _steps(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"data.generate: min_steps {self.min_steps} > max_steps {self.max_steps}")
        return self

    def generator_options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"kind", "n_train", "n_val", "seed"})


# The generators `data.generate` can name, told apart by `kind` (one class per kind).
GenerateCfg = Annotated[ProsQASyntheticCfg | ArithmeticSyntheticCfg, Field(discriminator="kind")]


class DataCfg(_Section):
    train_file: str
    val_file: str
    test_file: str | None = None
    max_seq_len: PositiveInt = 512
    cache_dir: str | None = None
    eval_max_examples: PositiveInt | None = None
    # e.g. {kind: prosqa_synthetic, n_train: 4000, n_val: 200, seed: 0}: the trainer writes a data file that is
    # missing (never one that exists), so check_files() does not require them.
    generate: GenerateCfg | None = None

    def files(self) -> dict[str, str]:
        """The data files this recipe names, by field."""
        out = {"train_file": self.train_file, "val_file": self.val_file}
        if self.test_file:
            out["test_file"] = self.test_file
        return out


class StepSupervisionCfg(_Section):
    """SIM-CoT's step-level supervision of the latents (model/step_supervision.py, docs/step_supervision.md)."""

    enabled: bool = False
    weight: float = Field(1.0, gt=0.0)  # loss = coconut loss + weight * step loss (SIM-CoT: 1.0)
    # pretrained: a separate decoder loaded from model.name_or_path (SIM-CoT: the pretrained base, not the
    # Coconut checkpoint); copy: a separate decoder loaded from what the base loads (checkpoint.init_from when
    # set); shared: no second model, the base model itself decodes.
    decoder: Literal["pretrained", "copy", "shared"] = "pretrained"
    # Text before each step's thoughts, "{k}" = the 1-based step (SIM-CoT's "Step {k} of the solution"); None: none.
    prompt: str | None = Field(None, min_length=1)
    stages: list[PositiveInt] | None = Field(None, min_length=1)  # curriculum stages it trains; None: all with latents
    # HF exports leave the training-only decoder out; true also writes it to <export>/step_decoder/ (decode-latents).
    export_decoder: bool = False

    def applies_to(self, stage: int) -> bool:
        return self.enabled and stage >= 1 and (self.stages is None or stage in self.stages)


class CoconutCfg(_Section):
    # coconut: latent curriculum. cot: stage 0 forever (language CoT SFT). no_cot: answer only.
    # no_thoughts: curriculum that removes steps but inserts no latents. pause_as_thought: the latents are
    # ordinary <|latent|> tokens with no hidden-state feedback (the paper's pause-token baseline).
    mode: Literal[MODES] = "coconut"
    c_thought: PositiveInt = 1  # latent thoughts that replace one language reasoning step
    epochs_per_stage: PositiveInt = 1
    max_latent_stage: NonNegativeInt = 1
    pad_latent_to_max: bool = False  # examples with fewer steps still get max_latent_stage*c_thought latents
    uniform_prob: float = Field(0.0, ge=0.0, le=1.0)  # chance an example is drawn at a random earlier stage
    # no_thoughts only: keep <|start-latent|><|end-latent|> around the empty thought. False is the official
    # run.py's "w/o thought" layout (it drops the markers); see data/curriculum.py.
    no_thoughts_markers: bool = True
    # The official run.py re-creates AdamW at the start of every epoch when this is set.
    reset_optimizer: bool = True
    step_supervision: StepSupervisionCfg = Field(default_factory=StepSupervisionCfg)

    @model_validator(mode="after")
    def _step_supervision_needs_latents(self):
        if self.step_supervision.enabled and self.mode not in ("coconut", "pause_as_thought"):
            raise ValueError(f"coconut.step_supervision.enabled: mode {self.mode!r} has no latent steps to decode; "
                             f"use coconut.mode 'coconut' or set coconut.step_supervision.enabled false")
        return self

    @model_validator(mode="after")
    def _latents_need_a_stage(self):
        if self.max_latent_stage == 0 and self.mode in ("coconut", "pause_as_thought"):
            raise ValueError(f"coconut.max_latent_stage 0 with coconut.mode {self.mode!r} never inserts a latent: "
                             f"set max_latent_stage >= 1, or mode 'cot' for language chain-of-thought only")
        return self

    @property
    def max_passes(self) -> int:
        """Base-model forward calls per training step at the last stage (counted by the curriculum itself)."""
        from coconut_scale.data.curriculum import CurriculumConfig

        return CurriculumConfig.from_recipe(self).max_passes


class CodiCfg(_Section):
    """`method: codi` (model/codi.py, data/codi_data.py): every switch of the released scripts that changes the
    math, with the released code's default (zhenyi4/codi src/model.py TrainingArguments); the GSM8k-Aug scripts
    pass use_prj true, prj_dim = the hidden size, distill_loss_div_std true, remove_eos true, num_latent 6."""

    num_latent: PositiveInt = 5  # continuous thoughts; evaluation runs as many (their inf_latent_iterations)
    use_prj: bool = False  # feed back prj(h) instead of h
    prj_dim: PositiveInt = 2048
    prj_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    prj_no_ln: bool = False  # drop the projection's final LayerNorm
    distill_loss_type: Literal["smooth_l1", "l2"] = "smooth_l1"
    distill_loss_div_std: bool = False
    distill_loss_factor: float = Field(1.0, ge=0.0)  # the Llama-1B script: 20
    ref_loss_factor: float = Field(1.0, ge=0.0)  # the teacher CE's weight
    include_last_cot: bool = False  # False: the teacher CoT drops its last step (train.py:270-272)
    remove_eos: bool = False  # True: eos only after the answer; False: also after the question and the CoT
    max_token_num: PositiveInt = 1000  # records longer than this are dropped (the Llama-1B script: 200)
    bos_rule: Literal["record0", "per_row"] = "record0"  # data/codi_data.py: record 0 decides BOS stripping
    lone_space_rule: Literal["model_name", "token"] = "model_name"  # data/codi_data.py: the answer position
    # Text answers and sentence steps (data/codi_data.py; the defaults are the released rules, which fit GSM8k-Aug):
    answer_filter: Literal["digit", "none"] = "digit"  # digit: drop records whose answer value is not a number
    answer_rule: Literal["last_number", "last_word"] = "last_number"  # evaluation: the prediction read from the text
    cot_rule: Literal["space_split", "steps"] = "space_split"  # what the teacher CoT drops: the last space-piece / step
    # SIM-CoT on CODI (coconut.step_supervision.enabled): reproduce their dedup_trailing_pads bug, which cuts every
    # row's step k to row 0's length (data/codi_steps.py); false gives every row its whole step.
    step_dedup_bug: bool = True


class BatchCfg(_Section):
    global_batch_size: PositiveInt  # constant across world sizes: micro x world x grad_accum
    micro_batch_size: PositiveInt  # per GPU, per forward; the default for world sizes not listed below
    micro_batch_per_world_size: dict[PositiveInt, PositiveInt] = Field(default_factory=dict)
    eval_batch_size: PositiveInt = 16
    world_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8, 16, 32, 64], min_length=1)

    @field_validator("world_sizes")
    @classmethod
    def _unique(cls, v):
        dupes = sorted({w for w in v if v.count(w) > 1})
        if dupes:
            raise ValueError(f"batch.world_sizes {v} lists {dupes} more than once")
        return v


class OptimCfg(_Section):
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    epochs: PositiveInt
    warmup_steps: NonNegativeInt = 0
    # transformers' get_scheduler names (coconut_scale/config/schedule.py: the steps a schedule spans)
    scheduler: Literal[SCHEDULERS] = "constant"
    grad_clip: float = Field(1.0, ge=0.0)  # global-norm clipping; 0 = off
    # Optimizer steps with a non-finite loss or gradient norm that may be skipped (gradients dropped, no update;
    # ZeRO stages 1-3) before the run stops, as Megatron and torchtitan allow; 0: the first one stops the run.
    skip_nonfinite_steps: NonNegativeInt = 0

    @model_validator(mode="after")
    def _constant_has_no_warmup(self):
        if self.scheduler == "constant" and self.warmup_steps > 0:
            raise ValueError(f"optim.scheduler 'constant' has no warmup, but optim.warmup_steps is {self.warmup_steps}: "
                             f"set optim.scheduler to 'constant_with_warmup' (or optim.warmup_steps to 0)")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        bad = [b for b in v if not 0.0 <= b < 1.0]
        if bad:
            raise ValueError(f"optim.betas {list(v)}: each beta must be in [0, 1), got {bad}")
        return v


class DeepSpeedCfg(_Section):
    config: str  # ds_configs/*.json; "auto" fields are filled from the recipe by ds_config.build_ds_config
    overrides: dict[str, Any] = Field(default_factory=dict)  # deep-merged into the JSON (null deletes a key)

    @field_validator("overrides")
    @classmethod
    def _no_scheduler(cls, v):
        if "scheduler" in v:
            raise ValueError("deepspeed.overrides.scheduler: the LR schedule is optim.scheduler and optim.warmup_steps "
                             "(built by the trainer, not DeepSpeed); remove it")
        return v


class CheckpointCfg(_Section):
    save_every_steps: NonNegativeInt = 0  # 0: at the end of each epoch only
    keep_last: PositiveInt = 2
    export_hf: bool = True  # also write an HF-format model (from_pretrained-able) at each save
    # The exports' weight dtype; None: model.dtype, what training holds the weights in (train/export.py).
    export_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    init_from: str | None = None  # HF-format export dir to start from (e.g. the CoT stage-0 model)
    # Start the curriculum at this epoch (the official GSM8K recipe's `resume: 3` skips stage 0 when
    # init_from is a CoT-trained model).
    resume_from_epoch: NonNegativeInt = 0
    auto_resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    # Recipe keys (or whole sections) a resume may change although they change the math, e.g. [optim.lr];
    # any other difference from the checkpoint's recipe stops the run (coconut_scale/train/recipe_guard.py).
    allow_changes: list[str] = Field(default_factory=list)
    # Signals that stop the run at the next optimizer step with a checkpoint, then exit 75 (train/preemption.py);
    # SLURM sends SIGUSR1 ahead of the time limit (launch/slurm.sbatch) and SIGTERM on preemption. []: none.
    on_signal: list[Literal[STOP_SIGNALS]] = Field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    @field_validator("allow_changes")
    @classmethod
    def _known_keys(cls, v):
        for key in v:
            _check_override_key(key.split("."), "checkpoint.allow_changes", key)
        return v


class DistributedCfg(_Section):
    # Seconds any collective may wait for a rank before every rank stops with an error (a dead or hung rank);
    # longer than the slowest work one rank does alone while the others wait (an export, tokenizing the data).
    timeout_s: float = Field(300.0, gt=0.0)


class LoggingCfg(_Section):
    log_every_steps: PositiveInt = 10
    wandb_project: str | None = None  # None: no wandb
    wandb_run_name: str | None = None  # None: the recipe name
    num_sample_outputs: NonNegativeInt = 20  # decoded validation samples logged per evaluation


class EvalCfg(_Section):
    max_new_tokens: PositiveInt = 64  # official: 64 for GSM8K, 128 for ProsQA / ProntoQA
    every_epochs: PositiveInt = 1
    generation: bool = True  # accuracy by greedy generation (else validation loss only)


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "runs/{name}"  # "{name}" is replaced by the recipe name
    seed: NonNegativeInt = 0
    gpus_assumed: PositiveInt  # documentation: the GPU count the recipe was written for
    gpu_memory_gb: float = Field(80.0, gt=0.0)  # per GPU; check.py flags estimates above it
    model: ModelCfg
    lora: LoraCfg = Field(default_factory=LoraCfg)
    data: DataCfg
    coconut: CoconutCfg = Field(default_factory=CoconutCfg)
    # coconut: the latent curriculum (the coconut section). codi: CODI's self-distillation (the codi section;
    # no curriculum: every epoch trains num_latent thoughts).
    method: Literal["coconut", "codi"] = "coconut"
    codi: CodiCfg = Field(default_factory=CodiCfg)
    batch: BatchCfg
    optim: OptimCfg
    deepspeed: DeepSpeedCfg
    checkpoint: CheckpointCfg = Field(default_factory=CheckpointCfg)
    distributed: DistributedCfg = Field(default_factory=DistributedCfg)
    logging: LoggingCfg = Field(default_factory=LoggingCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)

    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_section(self):
        self.output_dir = self.output_dir.replace("{name}", self.name)
        if self.method == "codi":
            if self.coconut.mode != "coconut":
                raise ValueError(f"method codi trains its own layout; coconut.mode {self.coconut.mode!r} must stay "
                                 f"'coconut'")
            step = self.coconut.step_supervision
            if step.enabled and (step.prompt is not None or step.stages is not None):
                raise ValueError("coconut.step_supervision.prompt and .stages: SIM-CoT's CODI variant has neither "
                                 "(every step decodes its thought alone, at every epoch); remove them")
            if self.checkpoint.init_from:
                raise ValueError("checkpoint.init_from: method codi starts from model.name_or_path (its teacher is "
                                 "the model itself)")
        if self.checkpoint.resume_from_epoch >= self.optim.epochs:
            raise ValueError(f"checkpoint.resume_from_epoch {self.checkpoint.resume_from_epoch} must be below "
                             f"optim.epochs {self.optim.epochs} (epochs are counted from 0)")
        return self

    @property
    def source(self) -> str:
        """The file this recipe was loaded from ("<dict>" when built in code)."""
        return self._source or "<dict>"

    def model_type(self) -> str | None:
        """model_type of the model (config/model_shape.py's lookup); None when unknown."""
        from coconut_scale.config.model_shape import UnknownModelError, recipe_shape

        try:
            return recipe_shape(self).get("model_type")
        except UnknownModelError:
            return None

    def lora_targets(self) -> list[str]:
        if self.lora.target_modules:
            return list(self.lora.target_modules)
        model_type = self.model_type()
        if model_type is None:
            raise RecipeError(f"{self.source}: cannot pick default LoRA targets, the architecture of "
                              f"{self.model.name_or_path!r} is unknown; set lora.target_modules")
        return default_lora_targets(model_type)

    def resolved_dict(self) -> dict:
        """Every field with defaults filled, JSON-safe; Recipe.model_validate() of it gives this recipe back."""
        return self.model_dump(mode="json")


# --- loading ---------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); recipes and overrides mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _sections(annotation) -> list[type]:
    """The BaseModel section classes a field annotation admits, through Optional, Annotated and unions (a tagged
    union of sections, e.g. data.generate: one class per kind)."""
    found, todo = [], [annotation]
    while todo:
        c = todo.pop(0)
        if isinstance(c, type) and issubclass(c, BaseModel):
            found.append(c)
        else:
            todo.extend(typing.get_args(c))
    return found


def _unwrap(annotation) -> tuple[type | None, bool]:
    """(BaseModel section class or None, whether it is a free-form mapping) for a field annotation; sees through
    Optional and Annotated. For a tagged union of sections the first; `_sections` gives them all."""
    found = _sections(annotation)
    if found:
        return found[0], False
    candidates = [annotation, *typing.get_args(annotation)]
    free = any(c is Any or c is dict or typing.get_origin(c) is dict for c in candidates)
    return None, free


def _fields_of(classes: list[type]) -> dict:
    """The fields of one section, or of every member of a tagged union (the first member's wins a shared name)."""
    fields: dict = {}
    for cls in classes:
        for name, info in cls.model_fields.items():
            fields.setdefault(name, info)
    return fields


def _without_tags(loc: Sequence) -> list:
    """An error location without the tag pydantic inserts after a tagged union's field
    (data.generate.prosqa_synthetic.n_train -> data.generate.n_train)."""
    classes: list[type] = [Recipe]
    out = []
    for part in loc:
        fields = _fields_of(classes)
        tags = {t for cls in classes if "kind" in cls.model_fields
                for t in typing.get_args(cls.model_fields["kind"].annotation)}
        if part in tags:
            classes = [c for c in classes if part in typing.get_args(c.model_fields["kind"].annotation)]
            continue  # the tag of the section's kind
        out.append(part)
        classes = _sections(fields[part].annotation) if part in fields else []
    return out


def _unknown_key_message(known: Sequence[str], key: str, prefix: str) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean '{prefix}{match[0]}'? " if match else ""
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    return f"{hint}{where} accepts: {', '.join(known)}"


def _check_override_key(parts: list[str], source: str, text: str) -> None:
    classes: list[type] = [Recipe]
    for i, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        fields = _fields_of(classes)
        if part not in fields:
            raise RecipeError(f"{source}: unknown key '{'.'.join(parts)}' in override {text!r}; "
                              + _unknown_key_message(list(fields), part, prefix))
        sections = _sections(fields[part].annotation)
        if not sections:
            if i < len(parts) - 1 and not _unwrap(fields[part].annotation)[1]:
                raise RecipeError(f"{source}: cannot set '{'.'.join(parts)}' in override {text!r}: "
                                  f"'{prefix}{part}' is a single value, not a section")
            return
        classes = sections


def apply_overrides(data: dict, overrides: Sequence[str], source: str = "<recipe>") -> dict[str, str]:
    """Apply `section.key=value` overrides to the raw recipe dict in place; returns {dotted key: override}."""
    applied: dict[str, str] = {}
    for text in overrides:
        key, sep, value_text = text.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(f"{source}: override {text!r} is not of the form section.key=value")
        _check_override_key(parts, source, text)
        try:
            value = _yaml(value_text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{source}: override {text!r}: the value is not valid YAML ({e})") from None
        node = data
        for depth, part in enumerate(parts[:-1]):
            part = next((k for k in node if str(k) == part), part)
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                here = ".".join(parts[: depth + 1])
                raise RecipeError(f"{source}: cannot apply override {text!r}: '{here}' is {node[part]!r}, not a mapping")
            node = node[part]
        last = next((k for k in node if str(k) == parts[-1]), parts[-1])
        node[last] = value
        applied[".".join(parts)] = text
    return applied


def _fields_at(loc: Sequence) -> list[str] | None:
    classes: list[type] = [Recipe]
    for part in loc:
        tags = {t for cls in classes if "kind" in cls.model_fields
                for t in typing.get_args(cls.model_fields["kind"].annotation)}
        if part in tags:  # a tagged union's member, named in pydantic's error location
            classes = [c for c in classes if part in typing.get_args(c.model_fields["kind"].annotation)]
            continue
        fields = _fields_of(classes)
        if not isinstance(part, str) or part not in fields:
            return None
        classes = _sections(fields[part].annotation)
        if not classes:
            return None
    return list(_fields_of(classes))


def _describe(error: dict) -> str:
    where = _without_tags(error["loc"])
    loc = ".".join(str(p) for p in where)
    kind = error["type"]
    if kind == "union_tag_not_found":
        keys = sorted(error["input"]) if isinstance(error["input"], dict) else error["input"]
        return f"{loc} needs a {error['ctx']['discriminator']}, got keys {keys}"
    if kind == "union_tag_invalid":
        ctx = error["ctx"]
        return f"{loc}.{ctx['discriminator'].strip(chr(39))} = {ctx['tag']!r}: expected one of {ctx['expected_tags']}"
    if kind == "extra_forbidden":
        *parent, key = where
        prefix = "".join(f"{p}." for p in parent)
        known = _fields_at(parent)
        return f"unknown key '{loc}'" + (f"; {_unknown_key_message(known, str(key), prefix)}" if known else "")
    if kind == "missing":
        return f"missing required key '{loc}'"
    if kind in ("value_error", "assertion_error"):
        # Our own validators name the field and value in the message; the raw input may be a whole section.
        msg = re.sub(r"^(Value|Assertion) error, ", "", error["msg"])
        return f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg
    return f"{loc} = {error['input']!r}: {error['msg']}"


def recipe_from_dict(data: dict, source: str = "<dict>", overrides: dict[str, str] | None = None) -> Recipe:
    """Validate a raw recipe dict; every problem is reported at once in one RecipeError."""
    overrides = overrides or {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            line = _describe(error)
            loc = ".".join(str(p) for p in _without_tags(error["loc"]))
            origin = [t for k, t in overrides.items()
                      if loc and (loc == k or loc.startswith(k + ".") or k.startswith(loc + "."))]
            if origin:
                line += f" (set by override {origin[0]!r})"
            problems.append(line)
        noun = "problem" if len(problems) == 1 else "problems"
        raise RecipeError(f"invalid recipe {source} ({len(problems)} {noun}):\n  - " + "\n  - ".join(problems),
                          problems) from None
    recipe._source = source
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = _yaml(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    applied = apply_overrides(data, list(overrides), str(path))
    return recipe_from_dict(data, str(path), applied)


def check_files(recipe: Recipe, *, data: bool = True, ds_config: bool = True, init_from: bool = False) -> None:
    """Raise RecipeError naming every missing file (field and path).

    Data files and init_from are opened relative to the cwd (launch from the repo root); the DeepSpeed JSON is
    also looked up in the checkout and the package (search_roots). Data that data.generate will write is not
    required.
    """
    wanted: list[tuple[str, str, bool]] = []  # (field, path, also look beyond the cwd)
    if data and recipe.data.generate is None:
        wanted += [(f"data.{field}", p, False) for field, p in recipe.data.files().items()]
    if ds_config:
        wanted.append(("deepspeed.config", recipe.deepspeed.config, True))
    if init_from and recipe.checkpoint.init_from:
        wanted.append(("checkpoint.init_from", recipe.checkpoint.init_from, False))
    from coconut_scale.model.loading import package_source_problem

    problems = [f"model.{field} = {problem}" for field in ("name_or_path", "tokenizer")
                if (problem := package_source_problem(getattr(recipe.model, field) or ""))]
    for field, p, anywhere in wanted:
        path = Path(p).expanduser()
        found = resolve_path(p).exists() if anywhere else (path if path.is_absolute() else Path.cwd() / path).exists()
        if not found:
            if path.is_absolute():
                where = str(path)
            else:
                where = " nor ".join(str(root / path) for root in (search_roots() if anywhere else [Path.cwd()]))
            problems.append(f"{field} = {p!r} does not exist (looked for {where})")
    if problems:
        raise RecipeError(f"recipe {recipe.source}: {len(problems)} missing file(s):\n  - " + "\n  - ".join(problems),
                          problems)

"""A recipe's exact training model and batches of its real layout, on fake tensors: shapes and dtypes, no memory.

The model is what the trainer builds: `model/spec.py`'s `build_training_model` on the recipe's `ModelSpec`
(config/model_spec.py), with each model source replaced by its architecture's config (no weights, no download) and,
optionally, fewer decoder layers. It is built on the meta device and then every parameter, buffer and tensor
attribute becomes a fake tensor of the same shape, dtype and tying (`to_fake`). Building under FakeTensorMode
directly does not work: peft moves every adapter to its base layer's device, and `Module._apply` cannot swap a fake
parameter (it holds weak references).

The batches are what the trainer's collators make of synthetic tokenized records, at the recipe's largest stage
(the most latent passes) and `data.max_seq_len` tokens per row, every row alike:

    training     question (max_seq_len / 4) <start> <latent> * c_thought*max_latent_stage <end> step answer EOS
                 (the replaced steps are STEP_TOKENS long each; the one step left in text fills the row)
    evaluation   question <start> <latent> * ... <end>, left-padded, then eval.max_new_tokens generated: the
                 question is as long as max_seq_len leaves
    (in both, the last row's question is one token shorter, so the batch is padded as real batches are)
    SIM-CoT      the step targets of data/step_targets.py for those rows (the replaced steps, the last joined)
    CODI         the student  question <bot> <latent> * num_latent <eot> answer EOS  and the teacher
                 question steps answer EOS  of data.max_seq_len tokens (codi.num_latent + 1 "<<...>>" steps
                 sharing the row), as data/codi_features.py makes them; SIM-CoT on CODI cuts its
                 step targets from that teacher row (data/codi_steps.py)

A tokenizer stand-in (`ShapeOnlyTokenizer`) gives the vocabulary size and the Coconut token ids; nothing here reads
text.
"""

from __future__ import annotations

import dataclasses

import torch

from coconut_scale.config.model_shape import recipe_shape
from coconut_scale.config.model_spec import model_spec
from coconut_scale.data.codi_features import CodiPartCollator, codi_feature
from coconut_scale.data.codi_steps import CodiStepCollator, StepIds
from coconut_scale.data.collate import LatentAlignedCollator, left_pad_for_generation
from coconut_scale.data.curriculum import CurriculumConfig, build_eval_example, build_train_example
from coconut_scale.data.step_targets import StepPieces, StepTargetCollator
from coconut_scale.model.loading import DTYPES, ModelSource
from coconut_scale.model.modes import STAGE0_MODES
from coconut_scale.model.shapes import hf_config
from coconut_scale.model.spec import build_training_model
from coconut_scale.model.tokens import SPECIAL_TOKENS, LatentTokens

STEP_TOKENS = 16  # a replaced reasoning step (GSM8K-Aug's "<<3*4=12>>" steps are 8-12 tokens)
ANSWER_TOKENS = 8  # "### 1234" before the EOS
PROMPT_TOKENS = 6  # SIM-CoT's optional step prompt ("Step {k} of the solution")


class ShapeOnlyTokenizer:
    """What the model builder asks of a tokenizer, for a vocabulary of `vocab_size` entries plus the three Coconut
    tokens at the end (as `add_latent_tokens` appends them): its length, those ids, EOS; text maps to one token."""

    def __init__(self, vocab_size: int, eos_token_id: int):
        self.vocab_size = int(vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = None
        self.unk_token_id = None

    def __len__(self) -> int:
        return self.vocab_size + len(SPECIAL_TOKENS)

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab_size + SPECIAL_TOKENS.index(t) if t in SPECIAL_TOKENS else None for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1]


def _eos_id(config) -> int:
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0


def shape_tokenizer(recipe) -> ShapeOnlyTokenizer:
    config = hf_config(recipe_shape(recipe))
    return ShapeOnlyTokenizer(config.vocab_size, _eos_id(config))


def layer_count(recipe) -> int:
    return hf_config(recipe_shape(recipe)).num_hidden_layers


def fake_spec(recipe, layers: int | None = None):
    """The recipe's ModelSpec with every source built from its architecture's config (`layers` decoder layers)."""
    shape = dict(recipe_shape(recipe))
    if layers is not None:
        config = hf_config(shape)
        shape[config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = int(layers)
    spec = model_spec(recipe)
    source = ModelSource(spec.source.path, from_config=shape)
    step = spec.step_supervision
    if step is not None and step.decoder is not None:
        step = dataclasses.replace(step, decoder=ModelSource(step.decoder.path, from_config=shape))
    return dataclasses.replace(spec, source=source, step_supervision=step)


def to_fake(model: torch.nn.Module, mode) -> torch.nn.Module:
    """Replace every meta parameter, buffer and tensor attribute of `model` by a fake CPU tensor of the same shape
    and dtype, in place; a tensor shared by several modules (tied embeddings) stays shared."""
    device = torch.device("cpu")
    fakes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta kept alive, its fake)

    def fake(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in fakes:
            value = mode.fake_tensor_converter.from_meta_and_device(mode, t.detach(), device)
            fakes[id(t)] = (t, torch.nn.Parameter(value, requires_grad=t.requires_grad) if parameter else value)
        return fakes[id(t)][1]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = fake(p, True)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b, False)
        for name, value in list(vars(module).items()):  # e.g. a rotary embedding's original_inv_freq
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, name, fake(value, False))
    return model


def fake_training_model(recipe, mode, layers: int | None = None):
    """The recipe's training model (a Coconut wrapper) on fake tensors, with `layers` decoder layers (all: None)."""
    spec = fake_spec(recipe, layers)
    # On the meta device peft leaves its adapters where they were made (it moves and casts them to the base layer's
    # dtype only off the meta device): made in the model's dtype, they are what a real build ends with.
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[spec.dtype])
    try:
        with torch.device("meta"):
            model = build_training_model(spec, shape_tokenizer(recipe))
    finally:
        torch.set_default_dtype(default)
    return to_fake(model, mode)


# --- batches ----------------------------------------------------------------------------------------------------


def largest_stage(recipe) -> int:
    """The stage with the most latent passes (every stage of cot / no_cot is stage 0)."""
    return 0 if recipe.coconut.mode in STAGE0_MODES else recipe.coconut.max_latent_stage


def _record(question: int, steps: list[int], tokens: LatentTokens, idx: int) -> dict:
    q, s, a = 10, 11, 12  # any ids below the vocabulary that are not Coconut tokens
    return {"idx": idx, "question_ids": [q] * question, "steps_ids": [[s] * n for n in steps],
            "answer_ids": [a] * ANSWER_TOKENS + [tokens.eos_id]}


def _fitted_record(recipe, tokens: LatentTokens, cfg: CurriculumConfig, stage: int, idx: int) -> dict:
    """A record whose training example at `stage` is exactly data.max_seq_len tokens (layout in the module doc)."""
    length = recipe.data.max_seq_len
    question = max(length // 4, 1)
    steps = [STEP_TOKENS] * cfg.max_latent_stage + [1]
    rec = _record(question, steps, tokens, idx)
    spare = length - len(build_train_example(rec, stage, cfg, tokens)["input_ids"])
    in_text = cfg.mode != "no_cot"  # no_cot drops every step: the question takes up the room
    if in_text and steps[-1] + spare >= 1:
        steps[-1] += spare
    else:
        question += spare
    if question < 1:
        raise ValueError(f"data.max_seq_len {length} cannot hold {cfg.max_latent_stage} latent steps of "
                         f"c_thought {cfg.c_thought} and an answer")
    return _record(question, steps, tokens, idx)


STEP_START, STEP_END = 15, 16  # the fake vocabulary's "<<" and ">>" (SIM-CoT on CODI cuts steps at them)


def _codi_row(recipe, tokens: LatentTokens, idx: int, question: int) -> dict:
    """A CODI row (data/codi_data.py build_codi_rows' fields) whose teacher sequence is data.max_seq_len long."""
    length, n = recipe.data.max_seq_len, recipe.codi.num_latent
    tail = [] if recipe.codi.remove_eos else [tokens.eos_id]
    q = [10] * question + tail
    answer = [12] * ANSWER_TOKENS + [tokens.eos_id]
    steps = [[STEP_START] + [11] * (STEP_TOKENS - 2) + [STEP_END] for _ in range(n + 1)]
    room = length - len(q) - len(answer) - sum(map(len, steps))
    if room < 0:
        raise ValueError(f"data.max_seq_len {length} cannot hold a CODI teacher row of {n + 1} steps of "
                         f"{STEP_TOKENS} tokens and a question of {question}")
    for k, step in enumerate(steps):  # the steps share the rest of the row (SIM-CoT pads them to the longest)
        step[1:1] = [11] * (room // len(steps) + (k < room % len(steps)))
    cot = [t for s in steps for t in s]
    decoder = [tokens.end_id] + tail + answer
    return {"index": idx, "encoder_input_ids": q + [tokens.start_id], "decoder_input_ids": decoder,
            "teacher_input_ids": q + cot + answer, "teacher_labels": [-100] * len(q) + cot + answer,
            "teacher_answer_position": len(q) + len(cot) - 1, "student_answer_position": len(tail)}


def _codi_training_batch(recipe, micro_batch: int, tokens: LatentTokens) -> dict:
    n = recipe.codi.num_latent
    question = max(recipe.data.max_seq_len // 4, 1)
    rows = [_codi_row(recipe, tokens, i, question - (1 if i == micro_batch - 1 and i > 0 else 0))
            for i in range(micro_batch)]
    features = [codi_feature(r, tokens, n) for r in rows]
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    part_inputs = {"codi": CodiPartCollator(tokens.pad_id, collate)(features)}
    if recipe.coconut.step_supervision.enabled:
        ids = StepIds((STEP_START,), STEP_END, tokens.eos_id, (tokens.eos_id, tokens.pad_id))
        part_inputs["step_supervision"] = CodiStepCollator(ids, n, recipe.codi.step_dedup_bug)(features)
    return {"batch": collate(features), "latent_columns": collate.latent_columns(features), "num_passes": n + 1,
            "part_inputs": part_inputs}


def training_batch(recipe, micro_batch: int) -> dict:
    """The trainer's inputs for one micro batch at the largest stage (as plain CPU tensors): `batch` (the collated
    input_ids, attention_mask, position_ids, labels), `latent_columns`, `num_passes` and `part_inputs`."""
    tokens = LatentTokens.from_tokenizer(shape_tokenizer(recipe))
    if recipe.method == "codi":
        return _codi_training_batch(recipe, micro_batch, tokens)
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    stage = largest_stage(recipe)
    records = [_fitted_record(recipe, tokens, cfg, stage, i) for i in range(micro_batch)]
    if micro_batch > 1:  # one row a token shorter: real batches are padded (and need an attention mask)
        records[-1]["question_ids"] = records[-1]["question_ids"][1:]
    features = [build_train_example(r, stage, cfg, tokens) for r in records]
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    part_inputs = None
    step = recipe.coconut.step_supervision
    if step.enabled and step.applies_to(stage):
        pieces = {r["idx"]: StepPieces(tuple(tuple(s) for s in r["steps_ids"]), tuple(r["answer_ids"][:-1]))
                  for r in records}
        prompt = (lambda k: [13] * PROMPT_TOKENS) if step.prompt else None
        targets = StepTargetCollator(pieces, cfg, tokens.eos_id, separator=[14], prompt_ids=prompt)
        part_inputs = {"step_supervision": targets(features)}
    passes = cfg.max_passes if cfg.uniform_prob > 0 else cfg.passes_for_stage(stage)  # as Trainer.planned_passes
    return {"batch": collate(features), "latent_columns": collate.latent_columns(features), "num_passes": passes,
            "part_inputs": part_inputs}


def generation_batch(recipe) -> dict:
    """One evaluation generation batch (batch.eval_batch_size prompts at the largest stage, each as long as
    max_seq_len leaves for eval.max_new_tokens): `input_ids`, `attention_mask`, `position_ids`, `latent_columns`,
    `num_passes`, `max_new_tokens`."""
    tokens = LatentTokens.from_tokenizer(shape_tokenizer(recipe))
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    stage = largest_stage(recipe)
    new = recipe.eval.max_new_tokens
    if recipe.method == "codi":  # data/codi_features.py codi_eval_examples: question <bot> latents <eot> [eos]
        n, tail = recipe.codi.num_latent, [] if recipe.codi.remove_eos else [tokens.eos_id]
        opening = [tokens.end_id] + tail
        question = max(recipe.data.max_seq_len - new - n - 1 - len(opening) - len(tail), 1)
        prompt = [10] * question + tail + [tokens.start_id] + [tokens.latent_id] * n + opening
        columns = list(range(question + len(tail) + 1, question + len(tail) + 1 + n))
        return _generation_inputs(prompt, columns, recipe.batch.eval_batch_size, tokens, new)
    probe = build_eval_example(_record(1, [STEP_TOKENS] * cfg.max_latent_stage, tokens, 0), stage, cfg, tokens)
    question = max(recipe.data.max_seq_len - new - (len(probe["input_ids"]) - 1), 1)
    rec = _record(question, [STEP_TOKENS] * cfg.max_latent_stage, tokens, 0)
    prompt = build_eval_example(rec, stage, cfg, tokens)["input_ids"]
    columns = [i for i, t in enumerate(prompt) if t == tokens.latent_id] if cfg.latent_feedback else []
    return _generation_inputs(prompt, columns, recipe.batch.eval_batch_size, tokens, new)


def _generation_inputs(prompt: list[int], columns: list[int], rows: int, tokens: LatentTokens, new: int) -> dict:
    prompts = [prompt] * rows
    if len(prompts) > 1:  # one prompt a token shorter: real batches are padded (and need an attention mask)
        prompts[-1] = prompt[1:]
    ids, mask, pos = left_pad_for_generation(prompts, tokens.pad_id)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "latent_columns": columns,
            "num_passes": len(columns) + 1, "max_new_tokens": new}

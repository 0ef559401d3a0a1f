"""LoRA (peft) for Coconut, with the three new token rows trainable while the base embedding is frozen.

peft's `trainable_token_indices` would do the latter but hard-codes a CUDA device under ZeRO-3, and
`modules_to_save` on the embedding copies the whole matrix (memory, and known save problems). Instead the
embedding module gets a small child module, `coconut_new_rows`, holding one trainable parameter `delta`
[3, hidden] that a forward hook adds to the embedding output wherever a Coconut token is. When the output
embedding is tied to the input one (GPT-2), a second hook adds the same rows' share to the new tokens'
logits, so the model always behaves as if the tied matrix itself had `row + delta` in those rows: that is
what a merged export can represent. A child *module* (not a bare parameter on the embedding) because the
lm_head hook uses it too: ZeRO-3 gathers a module's parameters when that module is called, so calling the
child from either hook makes `delta` present wherever it is used.

Exports (train/export.py's `export_hf(..., lora=True)`, through `LoraExport`) write
    <export>/                        the adapter merged into the base: a plain HF model (load_exported)
    <export>/adapter/                adapter_config.json + adapter_model.safetensors (peft format),
                                     coconut_new_tokens.safetensors (the Coconut token rows), tokenizer
and `load_lora_adapter(base, <export>/adapter)` puts the adapter back on the original base model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from coconut_scale.model.shapes import default_lora_targets
from coconut_scale.model.tokens import LatentTokens

NEW_ROWS = "coconut_new_rows"  # child module of the input embedding
ADAPTER = "default"  # peft's adapter name; peft drops it from saved keys
PEFT_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the HF model's own names
ADAPTER_DIR = "adapter"
NEW_TOKENS_FILE = "coconut_new_tokens.safetensors"


class NewTokenRows(nn.Module):
    """Trainable additions to the (frozen) embedding rows of the Coconut tokens."""

    def __init__(self, token_ids: list[int], hidden: int, dtype: torch.dtype, tied: bool):
        super().__init__()
        self.token_ids = [int(i) for i in token_ids]
        self.tied = bool(tied)
        # Zero: training starts from exactly the base model's rows.
        self.delta = nn.Parameter(torch.zeros(len(self.token_ids), hidden, dtype=dtype))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.token_ids, device=x.device)
        delta = self.delta.to(out.dtype)
        if not torch.is_floating_point(x):
            # Embedding side (x: token ids, out: embeddings). one_hot @ delta adds row k where the token is
            # new token k and zero elsewhere, without a Python loop or an in-place write.
            return out + (x[..., None] == ids).to(out.dtype) @ delta
        # Output side of a tied embedding (x: hidden states, out: logits): the new tokens' logits gain
        # hidden . delta, as if the tied row itself had moved.
        # In place: the head's fresh logits (its backward needs its inputs, not its output), so the [N, V] logits are
        # not copied for three columns (a chunk of the loss is the largest tensor of a step at large vocabularies).
        return out.index_add_(out.dim() - 1, ids, x.to(out.dtype) @ delta.T)


def _embedding_hook(module, inputs, output):
    return getattr(module, NEW_ROWS)(inputs[0], output)


def _make_output_hook(rows: NewTokenRows):
    def hook(module, inputs, output):
        return rows(inputs[0], output)

    return hook


def _is_tied(base) -> bool:
    out = base.get_output_embeddings()
    return out is not None and out.weight is base.get_input_embeddings().weight


def lora_config(spec, model_type: str):
    """peft's LoraConfig for `spec` (rank, alpha, dropout, target_modules: the model spec's LoraSpec), the one used
    for every model LoRA wraps. No targets: default_lora_targets(model_type)."""
    from peft import LoraConfig

    targets = list(spec.target_modules) if spec.target_modules else default_lora_targets(model_type)
    # GPT-2's Conv1D stores weights transposed; peft would flip the flag itself, with a warning per layer.
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      fan_in_fan_out=model_type == "gpt2", bias="none", task_type="CAUSAL_LM")


def wrap_with_lora(model, spec):
    """A PeftModel over the plain HF `model`: adapters on spec's targets, everything else frozen."""
    from peft import get_peft_model

    config = lora_config(spec, model.config.model_type)
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias; the alias warns, peft's to fix.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            # Adapters in the base's dtype: peft would upcast bf16 adapters to fp32, and DeepSpeed's bf16 engine
            # flattens every trainable parameter into one buffer of one dtype (it keeps fp32 masters itself).
            return get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:  # peft's message lists what it could not find; say where the names came from
        raise ValueError(f"lora.target_modules={list(config.target_modules)} (model_type "
                         f"{model.config.model_type!r}): {e}") from e


def apply_lora(model, spec, tokenizer, dtype: torch.dtype | None = None) -> None:
    """Wrap `model.base_causallm` (a Coconut wrapper's HF model) with LoRA adapters in place.

    `spec` is a LoraSpec (model/spec.py). `dtype` is the model's parameter dtype; the caller passes it when the
    embedding is a partitioned placeholder (ZeRO-3) whose own dtype says nothing. Call after the new token rows
    are initialised and before the engine is built (under ZeRO-3 peft must wrap the partitioned model before
    DeepSpeed builds its optimizer). Afterwards exactly the adapters and `coconut_new_rows.delta` require grad.
    """
    base = model.base_causallm
    tokens = LatentTokens.from_tokenizer(tokenizer)  # fails clearly if the tokenizer lacks the Coconut tokens
    new_ids = [tokens.start_id, tokens.latent_id, tokens.end_id]
    embedding = base.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"LoRA new-token rows need an nn.Embedding input embedding, got {type(embedding).__name__}")
    vocab = embedding.num_embeddings
    bad = [i for i in new_ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"Coconut token ids {bad} are outside the embedding's {vocab} rows: resize the model first")

    peft_model = wrap_with_lora(base, spec)

    dtype = dtype or embedding.weight.dtype
    tied = _is_tied(base)
    rows = NewTokenRows(new_ids, embedding.embedding_dim, dtype, tied)
    embedding.add_module(NEW_ROWS, rows)
    embedding.register_forward_hook(_embedding_hook)
    if tied:
        base.get_output_embeddings().register_forward_hook(_make_output_hook(rows))
    model.base_causallm = peft_model


def new_token_rows(model) -> NewTokenRows:
    rows = getattr(model.base_causallm.get_input_embeddings(), NEW_ROWS, None)
    if rows is None:
        raise ValueError("this model has no LoRA new-token rows: was apply_lora() called?")
    return rows


def lora_layout(peft_model) -> dict[str, tuple[float, bool]]:
    """{module name in the HF model: (scaling, fan_in_fan_out)} of every LoRA layer.

    Read from peft's layers rather than recomputed from the recipe: scaling is alpha/r (alpha/sqrt(r) with
    rsLoRA), and GPT-2's Conv1D stores weights transposed (fan_in_fan_out), which a shape test cannot tell
    for square layers such as attn.c_proj.
    """
    from peft.tuners.lora import LoraLayer

    layout = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            layout[key] = (float(module.scaling[ADAPTER]), bool(module.fan_in_fan_out))
    return layout


def _module_names(base) -> tuple[str, str | None]:
    names = {id(m): n for n, m in base.named_modules()}
    out = base.get_output_embeddings()
    return names[id(base.get_input_embeddings())], (names.get(id(out)) if out is not None else None)


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def merge_lora_state(state: dict, layout: dict[str, tuple[float, bool]], rows: NewTokenRows | None = None,
                     embedding_name: str | None = None, output_name: str | None = None) -> dict:
    """A peft model's full state dict -> the plain HF model's, with adapters merged and (with `rows`) the Coconut
    token rows folded into the embedding; `rows` None: a model with no new rows (SIM-CoT's separate decoder).

    `state` keys are the peft model's (`base_model.model.` prefix, `.base_layer.`, `.lora_A.default.`).
    Merged weight = W + scaling * B @ A (transposed for fan_in_fan_out layers), computed in fp32.
    """
    merged, lora_a, lora_b, delta = {}, {}, {}, None
    delta_key = f"{embedding_name}.{NEW_ROWS}.delta" if rows is not None else None
    for key, value in state.items():
        name = _strip(key)
        if f".lora_A.{ADAPTER}." in name:
            lora_a[name.split(".lora_A.")[0]] = value
        elif f".lora_B.{ADAPTER}." in name:
            lora_b[name.split(".lora_B.")[0]] = value
        elif name == delta_key:
            delta = value
        elif ".lora_" in name:  # DoRA magnitudes, embedding adapters...: not something this merge knows
            raise ValueError(f"cannot merge LoRA state key {key!r}: only lora_A/lora_B of linear layers are supported")
        else:
            merged[name.replace(".base_layer.", ".")] = value
    if set(lora_a) != set(layout) or set(lora_b) != set(layout):
        raise ValueError(f"LoRA state and model disagree: state has A for {sorted(lora_a)[:4]}..., B for "
                         f"{sorted(lora_b)[:4]}..., the model has adapters on {sorted(layout)[:4]}... "
                         f"({len(lora_a)}, {len(lora_b)}, {len(layout)} modules)")
    if rows is not None and delta is None:
        raise ValueError(f"state has no {delta_key!r} (the Coconut token rows)")
    for module, (scaling, fan_in_fan_out) in layout.items():
        w = merged[module + ".weight"]
        update = (lora_b[module].float() @ lora_a[module].float()) * scaling
        if fan_in_fan_out:
            update = update.T
        merged[module + ".weight"] = (w.float() + update).to(w.dtype)
    if rows is None:
        return merged
    emb_key = embedding_name + ".weight"
    emb = merged[emb_key].clone()
    emb[rows.token_ids] = (emb[rows.token_ids].float() + delta.float()).to(emb.dtype)
    merged[emb_key] = emb
    if rows.tied and output_name is not None and output_name + ".weight" in merged:
        merged[output_name + ".weight"] = emb  # same tensor: save_pretrained keeps the tie
    return merged


class LoraExport:
    """A LoRA model's export (train/export.py): the adapter merged into the base for the HF export (`__call__`),
    and the unmerged adapter beside it (`write_extras`)."""

    def __init__(self, model):
        self.peft_model = model.base_causallm
        self.rows = new_token_rows(model)
        self.layout = lora_layout(self.peft_model)
        self.embedding_name, self.output_name = _module_names(self.peft_model.get_base_model())

    def __call__(self, state: dict):
        merged = merge_lora_state(state, self.layout, self.rows, self.embedding_name, self.output_name)
        return self.peft_model.get_base_model(), merged

    def write_extras(self, state: dict, directory: Path, tokenizer=None) -> Path:
        """`<directory>/adapter/`: peft's adapter files, the Coconut token rows, the tokenizer. Rank 0 only;
        `state` is the consolidated (real, gathered) peft state dict."""
        from safetensors.torch import save_file

        out = Path(directory) / ADAPTER_DIR
        out.mkdir(parents=True, exist_ok=True)
        # peft picks the LoRA keys out of `state`; save_embedding_layers=False: the "auto" default would
        # look the base up on the Hub and, finding the vocabulary resized, save both full embedding matrices.
        self.peft_model.save_pretrained(str(out), state_dict=state, save_embedding_layers=False)
        emb = state[PEFT_PREFIX + self.embedding_name + ".weight"]
        delta = state[f"{PEFT_PREFIX}{self.embedding_name}.{NEW_ROWS}.delta"]
        ids = self.rows.token_ids
        # Absolute rows, not the delta: the adapter then does not depend on how the base's rows were
        # initialised (resize_token_embeddings' random mean init for a hub model, the init text...).
        tensors = {"token_ids": torch.tensor(ids, dtype=torch.int64),
                   "input_rows": (emb[ids].float() + delta.float()).to(emb.dtype).contiguous()}
        if not self.rows.tied and self.output_name is not None:
            tensors["output_rows"] = state[PEFT_PREFIX + self.output_name + ".weight"][ids].contiguous()
        for name, t in tensors.items():
            if t.numel() == 0:  # a ZeRO-3 placeholder instead of a gathered tensor
                raise RuntimeError(f"{NEW_TOKENS_FILE}: {name} is empty; was the state gathered?")
        save_file(tensors, str(out / NEW_TOKENS_FILE),
                  metadata={"vocab_size": str(emb.shape[0]), "tied": json.dumps(self.rows.tied)})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out


def merged_plain_model(peft_model, state: dict) -> tuple:
    """(plain HF model, its state dict) of a peft model without Coconut rows, adapters merged; a model without
    LoRA comes back as it is. `state` is its consolidated state dict (its own keys)."""
    if not hasattr(peft_model, "get_base_model"):
        return peft_model, state
    return peft_model.get_base_model(), merge_lora_state(state, lora_layout(peft_model))


def load_lora_adapter(base, adapter_dir: str | Path, is_trainable: bool = False):
    """Put an adapter written by `LoraExport.write_extras` back onto the base model it was trained on.

    `base` is the plain HF model (e.g. `AutoModelForCausalLM.from_pretrained(<base id>)`); it is resized to
    the adapter's vocabulary, the Coconut token rows are written into it (input rows; output rows too when
    the lm_head is separate), then peft loads the adapter. Returns the PeftModel.
    """
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    path = adapter_dir / NEW_TOKENS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {adapter_dir} a coconut_scale LoRA adapter directory?")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    vocab, tied = int(meta["vocab_size"]), json.loads(meta["tied"])
    if tied != _is_tied(base):
        raise ValueError(f"{adapter_dir}: adapter trained with tied={tied} embeddings, base has tied={_is_tied(base)}")
    if base.get_input_embeddings().num_embeddings != vocab:
        base.resize_token_embeddings(vocab)
    ids = tensors["token_ids"]
    with torch.no_grad():
        emb = base.get_input_embeddings().weight
        emb[ids] = tensors["input_rows"].to(emb.dtype)
        if "output_rows" in tensors:
            out = base.get_output_embeddings().weight
            out[ids] = tensors["output_rows"].to(out.dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)

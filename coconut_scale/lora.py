"""LoRA (peft) for Coconut, with the three new token rows trainable while the base embedding is frozen.

peft's `trainable_token_indices` would do the latter but assumes CUDA under ZeRO-3, and `modules_to_save`
on the embedding copies the whole matrix (memory, and known save problems). Instead the embedding module
gets one small trainable parameter, `coconut_new_rows` [3, hidden], added by a forward hook to the output
at positions holding a Coconut token. It is an ordinary parameter of the embedding module, so ZeRO-3
partitions and gathers it with that module, and exports fold it into the embedding rows.
"""

from __future__ import annotations

import torch
from torch import nn

from coconut_scale.recipe import default_lora_targets
from coconut_scale.tokens import SPECIAL_TOKENS

NEW_ROWS = "coconut_new_rows"


def _add_new_rows(embedding: nn.Module, new_ids: list[int], hidden: int, dtype) -> None:
    embedding.register_parameter(NEW_ROWS, nn.Parameter(torch.zeros(len(new_ids), hidden, dtype=dtype)))
    ids = torch.tensor(new_ids)

    def hook(module, inputs, output):
        input_ids = inputs[0]
        delta = getattr(module, NEW_ROWS)
        # one_hot @ delta adds row k of delta where the token is new id k; zero elsewhere. No Python loop.
        which = (input_ids[..., None] == ids.to(input_ids.device)).to(delta.dtype)
        return output + which @ delta

    embedding.register_forward_hook(hook)


def apply_lora(model, recipe, tokenizer) -> None:
    """Wrap `model.base_causallm` (a Coconut wrapper's HF model) with LoRA adapters in place."""
    from peft import LoraConfig, get_peft_model

    base = model.base_causallm
    targets = recipe.lora.target_modules or default_lora_targets(base.config.model_type)
    config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    embedding = peft_model.get_input_embeddings()
    hidden = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.n_embd
    weight = embedding.weight
    dtype = weight.ds_tensor.dtype if hasattr(weight, "ds_tensor") else weight.dtype
    new_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    _add_new_rows(embedding, new_ids, hidden, dtype)
    model.base_causallm = peft_model
    model.lora_scale = recipe.lora.alpha / recipe.lora.rank
    model.lora_new_ids = list(new_ids)


def merge_lora_state(state: dict, scale: float, new_ids: list[int]) -> dict:
    """A peft model's full state dict -> the plain HF model's, with adapters merged and new rows folded in."""
    merged, lora_a, lora_b, new_rows = {}, {}, {}, None
    for key, value in state.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if ".lora_A." in name:
            lora_a[name.split(".lora_A.")[0]] = value
        elif ".lora_B." in name:
            lora_b[name.split(".lora_B.")[0]] = value
        elif name.endswith(NEW_ROWS):
            new_rows = (name[: -len(NEW_ROWS)] + "weight", value)
        else:
            merged[name.replace(".base_layer.", ".")] = value
    for module, a in lora_a.items():
        w = merged[module + ".weight"]
        delta = (lora_b[module].float() @ a.float()) * scale
        if w.shape != delta.shape:  # GPT-2's Conv1D stores weights transposed
            delta = delta.T
        merged[module + ".weight"] = (w.float() + delta).to(w.dtype)
    if new_rows is not None:
        emb_key, rows = new_rows
        emb = merged[emb_key].clone()
        emb[new_ids] = (emb[new_ids].float() + rows.float()).to(emb.dtype)
        merged[emb_key] = emb
    return merged


def merged_base_for_export(model):
    """The `to_base` hook of checkpoint.export_hf for a LoRA model."""
    peft_model = model.base_causallm
    new_ids, scale = model.lora_new_ids, model.lora_scale

    def to_base(state: dict):
        return peft_model.get_base_model(), merge_lora_state(state, scale, new_ids)

    return to_base

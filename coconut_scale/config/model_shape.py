"""The architecture of a recipe's model, found one way for every caller (check, the memory estimate, the trainer).

In order: `model.from_config` (a random-init model is exactly that config), the known shapes of
coconut_scale/model/shapes.py or a local directory's config.json (for `model.name_or_path`, then
`checkpoint.init_from`), and last the model's own config through `AutoConfig` (the hub cache or a download; a
`package:` source or a GGUF is read locally). Only the last step can touch the network, and only for models
the shapes table does not know.
"""

from __future__ import annotations

from coconut_scale.errors import UserError
from coconut_scale.model.shapes import dims, shape_for


class UnknownModelError(UserError):
    """The recipe's model architecture cannot be found without loading the model."""


def recipe_shape(recipe) -> dict:
    """HF config kwargs (with model_type) of the model the recipe trains."""
    model = recipe.model
    if model.from_config is not None:
        shape = dict(model.from_config)
        if "vocab_size" not in shape and model.bpe_vocab_size is not None:
            shape["vocab_size"] = model.bpe_vocab_size  # the trainer sizes the model to that tokenizer
        return shape
    for candidate in (model.name_or_path, recipe.checkpoint.init_from):
        shape = shape_for(candidate) if candidate else None
        if shape:
            return shape
    return _auto_config_shape(recipe)


def _auto_config_shape(recipe) -> dict:
    from transformers import AutoConfig

    from coconut_scale.config.model_spec import base_source
    from coconut_scale.model.loading import resolve_source

    source = base_source(recipe)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    field = "checkpoint.init_from" if recipe.checkpoint.init_from else "model.name_or_path"
    source = source.path
    try:
        config = AutoConfig.from_pretrained(resolve_source(source), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UnknownModelError(
            f"{recipe.source}: unknown architecture for {field} = {source!r} ({type(e).__name__}: {e}); add its shape "
            f"to coconut_scale/model/shapes.py SHAPES (config.json numbers) or point {field} to a local directory "
            f"with a config.json") from None
    return config.to_dict()


def hidden_size(recipe) -> int:
    """Hidden width of the recipe's model (the DeepSpeed bucket sizes scale with it)."""
    return dims(recipe_shape(recipe)).hidden

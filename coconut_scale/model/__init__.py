"""The model wing: the Coconut wrapper and everything it needs from HF (cache, checkpointing, tokens, LoRA,
loading, shapes) plus the plain reference implementation. Nothing here imports DeepSpeed.

`from coconut_scale.model import Coconut` is the official drop-in (facebookresearch/coconut's coconut.py).
"""

from coconut_scale.model.coconut import Coconut, CoconutOutput

__all__ = ["Coconut", "CoconutOutput"]

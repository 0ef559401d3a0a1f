"""What the CODI part's tests share (tests/model/test_codi_part.py, test_simcot_codi.py): the records, a tiny
Coconut with its CODI part (optionally LoRA with non-zero adapters), the HF model inside it, its gradients."""

import torch

from coconut_scale.model.codi import CodiPart, CodiSpec
from coconut_scale.model.coconut import Coconut
from coconut_scale.testing import tiny_config

NUM_LATENT = 2
RECORDS = [
    {"question": "Janet had 3 apples and bought 4 more.", "steps": ["<<3+4=7>>", "<<7*2=14>>"], "answer": "14"},
    {"question": "Q: 12 + 30 = ?", "steps": ["<<12+30=42>>", "<<42*1=42>>"], "answer": "42"},
    {"question": "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus?",
     "steps": ["<<1+1=2>>", "<<2+5=7>>", "<<7*2=14>>"], "answer": "7"},
]


def build(arch, tokenizer, tokens, spec=CodiSpec(num_latent=NUM_LATENT, prj_dim=48), lora=False):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=len(tokenizer), eos_id=tokens.eos_id, pad_token_id=None)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    model.add_part(CodiPart(config.hidden_size, spec))
    if lora:
        from coconut_scale.model.lora import apply_lora
        from coconut_scale.model.spec import LoraSpec

        apply_lora(model, LoraSpec(rank=4, alpha=8, dropout=0.0), tokenizer)
        with torch.no_grad():  # B starts at zero: give the adapters something to differentiate through
            for name, p in model.named_parameters():
                if "lora_B" in name or "coconut_new_rows" in name:
                    p.normal_(0.0, 0.05)
    return model


def hf_model(model):
    base = model.base_causallm
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out

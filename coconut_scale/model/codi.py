"""CODI (Shen et al. 2025, zhenyi4/codi) as a method part of the Coconut wrapper: self-distillation of a teacher
that reads the CoT into a student that reasons in continuous thoughts, one model for both.

The student is the Coconut core on the layout (data/codi_features.py)

    question <bot> <latent> * num_latent <eot> "The answer is: N" <eos>

so the latent loop, its KV carry, checkpointing and ZeRO-3 paths are the core's. What CODI changes:

  - feedback: every fed-back state goes through the projection (`project_feedback`; released src/model.py:190-200:
    Dropout, Linear(H, prj_dim), GELU, Linear(prj_dim, H), LayerNorm(H) unless prj_no_ln; identity without
    use_prj), in training and generation;
  - the core's loss is CODI's student CE (answer + eos; the eot label is dropped by the shift);
  - `loss_terms` adds the teacher pass (the same weights, no separate copy) over question + CoT + answer + eos,
    its CE ("teacher"), and the distillation ("distill"): for each hidden-state entry j (embedding output, each
    block, the last after the final norm), d_j = SmoothL1 (or MSE for "l2") between the student's state at the
    token before the answer value and the teacher's there, detached, a mean over B*H; with div_std divided by the
    std of the teacher's B*H values (unbiased; twice for l2); distill = mean_j d_j (src/model.py:356-368);
  - the trainer forms  student CE + distill_loss_factor * distill + ref_loss_factor * teacher CE
    (src/model.py:400) from the loss weights (config/model_spec.py).

The released code runs the teacher twice (a no-grad pass for the targets, one with grad for the CE,
src/model.py:296-298); here one pass gives both, its states detached for the targets: the same values and
gradients unless dropout is active (their hard-coded LoRA dropout 0.1 draws two masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coconut_scale.model.chunked_loss import chunked_shifted_cross_entropy
from coconut_scale.model.method_part import MethodPart

CODI_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_position", "student_column",
             "last_latent_column")
DISTILL_LOSS_TYPES = ("smooth_l1", "l2")


@dataclass(frozen=True)
class CodiSpec:
    """The switches of the released scripts that change CODI's model, defaulting to the GSM8k-Aug scripts' values
    (the recipe's `codi` section defaults to the code's; the loss factors are loss weights, config/model_spec.py)."""

    num_latent: int = 6
    use_prj: bool = True
    prj_dim: int = 2048
    prj_dropout: float = 0.0
    prj_no_ln: bool = False
    distill_loss_type: str = "smooth_l1"
    distill_loss_div_std: bool = True

    def __post_init__(self):
        if self.num_latent < 1:
            raise ValueError(f"codi.num_latent must be >= 1 (the answer pass follows the last latent), got "
                             f"{self.num_latent}")
        if self.distill_loss_type not in DISTILL_LOSS_TYPES:
            raise ValueError(f"codi.distill_loss_type must be one of {DISTILL_LOSS_TYPES}, got "
                             f"{self.distill_loss_type!r}")


def codi_projection(hidden_size: int, prj_dim: int, dropout: float = 0.0, no_ln: bool = False) -> nn.Sequential:
    """src/model.py:192-200; the children's names (0, 1, 2, 3, ln) are the released state-dict keys."""
    prj = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, prj_dim), nn.GELU(),
                        nn.Linear(prj_dim, hidden_size))
    if not no_ln:
        prj.add_module("ln", nn.LayerNorm(hidden_size))
    return prj


def distillation(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], loss_type: str,
                 div_std: bool) -> torch.Tensor:
    """mean_j d_j over the hidden-state entries (module doc); `student`, `teacher`: [B, H] per entry."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student hidden-state entries against {len(teacher)} teacher ones")
    loss_fn = F.smooth_l1_loss if loss_type == "smooth_l1" else F.mse_loss
    per_entry = []
    for out, ref in zip(student, teacher):
        ref = ref.detach().float()
        d = loss_fn(out.float(), ref)
        if div_std:
            std = ref.std()
            d = d / std / std if loss_type == "l2" else d / std
        per_entry.append(d)
    return torch.stack(per_entry).mean()


class CodiPart(MethodPart):
    """CODI's projection, teacher pass and distillation (see the module doc)."""

    name = "codi"
    terms = ("teacher", "distill")
    projects_feedback = True

    def __init__(self, hidden_size: int, spec: CodiSpec, dtype: torch.dtype | None = None):
        super().__init__()
        self.spec = spec
        self.prj = (codi_projection(hidden_size, spec.prj_dim, spec.prj_dropout, spec.prj_no_ln)
                    if spec.use_prj else nn.Identity())
        if dtype is not None:
            self.prj.to(dtype)

    def project_feedback(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.prj(hidden)

    def state_columns(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # [B, 2]: the token before the answer value (distillation) and the last latent (z_n, for SIM-CoT's decoder)
        return torch.stack([inputs["student_column"], inputs["last_latent_column"]], dim=1)

    def last_thought(self, out) -> torch.Tensor:
        """z_n = prj(state after the last latent) [B, H]: computed by the released loop and never fed; SIM-CoT's
        step decoder reads it as the thought of the last step."""
        return self.project_feedback(out.column_states[-1][:, 1])

    @torch.no_grad()
    def prompt_thoughts(self, core, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's latent passes over left-padded generation prompts (question <bot> latents <eot> ...), the
        passes generate() runs: (the filled input embeddings [B, T, H], z_n [B, H]). z_0..z_{n-1} are the filled
        embeddings at the latent columns; z_n is prj of the final-norm state at the last latent column, what
        `last_thought` reads in training (the prompt's last pass starts at that column, as training's does)."""
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(input_ids == core.latent_token_id, columns, -1).amax(dim=1)  # [B], no host sync
        out = core(input_ids, attention_mask, position_ids=position_ids, state_columns=last)
        return out.inputs_embeds, self.project_feedback(out.column_states[-1])

    def loss_terms(self, core, input_ids, inputs: dict[str, torch.Tensor], out) -> dict[str, torch.Tensor]:
        if out.column_states is None:
            raise ValueError("the CODI part needs the core's column_states (Coconut.forward with part_inputs)")
        teacher_ids = inputs["teacher_input_ids"]
        # use_cache=False: with checkpointing a DynamicCache would be appended to again on recompute.
        teacher = core.base_causallm.get_decoder()(input_ids=teacher_ids,
                                                   attention_mask=inputs["teacher_attention_mask"],
                                                   output_hidden_states=True, use_cache=False)
        head = core.base_causallm.get_output_embeddings()
        chunks = core.loss_chunks or 1
        teacher_ce = chunked_shifted_cross_entropy(teacher.last_hidden_state, inputs["teacher_labels"], head, chunks)
        rows = torch.arange(teacher_ids.shape[0], device=teacher_ids.device)
        position = inputs["teacher_position"]
        targets = tuple(h[rows, position] for h in teacher.hidden_states)
        distill = distillation(tuple(s[:, 0] for s in out.column_states), targets, self.spec.distill_loss_type, self.spec.distill_loss_div_std)
        return {"teacher": teacher_ce, "distill": distill}

"""What the step decoder must read back out of each latent step (SIM-CoT's targets), batched.

SIM-CoT (Wei et al. 2025; InternLM/SIM-CoT, Coconut/coconut.py, `explain_mode: v1_aug`) trains an auxiliary
decoder to decode latent step k (its c_thought continuous thoughts) into the text of reasoning step k. Per row,
with n_skip = the steps the stage replaced by latents and n = the row's latent steps (n_latents / c_thought):

    targets[k] = steps[k]                                   k < max_latent_stage - 1
    targets[m] = steps[m] "\\n" steps[m+1] "\\n" ... steps[n_skip-1]   m = max_latent_stage - 1 (the last latent step
                                                           takes every remaining replaced step, as SIM-CoT does)
    a row with fewer replaced steps than latent steps decodes its answer text ("### 42", no EOS) in the
    missing places (SIM-CoT's "pseudo thought": the tokens after <|end-latent|> up to EOS).

Differences from their code, on purpose: the step count is each row's own (theirs reads row 0's), and steps are
the records' own step strings tokenized without the newline the training sequence puts after them (theirs
re-parses "<<...>>" groups out of the GSM8K token stream, which only works for that data set). Joined steps are
the pieces' tokens with the tokens of "\\n" between them, as their separator token.

The batch (`StepTargetCollator`) is flat over (row, step) pairs, so the decoder runs once per batch however
many steps each row has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from coconut_scale.data.curriculum import CurriculumConfig, train_layout
from coconut_scale.errors import UserError

STEP_SEPARATOR = "\n"


class StepTargetError(UserError):
    """A training example whose step targets cannot be built (unknown record, latents not in whole steps)."""


@dataclass(frozen=True)
class StepPieces:
    """One record's step texts and answer, tokenized for the decoder (no trailing newline, no EOS)."""

    steps: tuple[tuple[int, ...], ...]
    answer: tuple[int, ...]


def tokenize_step_pieces(tokenized: Sequence[dict], tokenizer) -> dict[int, StepPieces]:
    """{record idx: StepPieces} for tokenized records (data/tokenized.py keeps each record's step texts).

    The answer is the record's own `answer_ids` without its EOS: exactly what follows <|end-latent|> when the
    stage has replaced every step.
    """
    texts = [s for rec in tokenized for s in rec["steps"]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, pos = {}, 0
    for rec in tokenized:
        n = len(rec["steps"])
        answer = list(rec["answer_ids"])
        if answer and answer[-1] == tokenizer.eos_token_id:
            answer = answer[:-1]
        out[int(rec["idx"])] = StepPieces(tuple(tuple(ids) for ids in encoded[pos:pos + n]), tuple(answer))
        pos += n
    return out


def step_targets(pieces: StepPieces, n_skipped: int, n_latent_steps: int, max_latent_stage: int,
                 separator: Sequence[int]) -> list[list[int]]:
    """The decoder's target tokens for each of a row's `n_latent_steps` latent steps (rules in the module doc)."""
    groups = [list(s) for s in pieces.steps[:n_skipped]]
    groups += [list(pieces.answer)] * (n_latent_steps - len(groups))
    last = max(max_latent_stage, 1) - 1  # from this step on, the replaced steps share one target
    targets = groups[:min(n_latent_steps, last)]
    if n_latent_steps > last:
        joined: list[int] = []
        for group in groups[last:]:
            joined += (list(separator) if joined else []) + group
        targets.append(joined)
    return targets


class StepTargetCollator:
    """Features of one micro-batch (with "idx", "stage", "n_latents") -> the decoder's flat (row, step) targets.

    Returns LongTensors, one entry per (row, latent step) pair, rows in batch order and steps in order:
        step_targets  [N, L]  target tokens, right-padded with EOS (L = longest target + 1)
        step_lengths  [N]     target tokens of each pair (its EOS label sits at that index)
        step_rows     [N]     the pair's row in the batch
        step_index    [N]     k, the latent step (0-based)
        step_prompts         [N, P]  the step prompt of each pair, left-padded (P = 0 without a prompt)
        step_prompt_lengths  [N]
    N may be 0 (no row has a latent): the model still runs its decoder once (model/step_supervision.py).
    """

    def __init__(self, pieces: dict[int, StepPieces], cfg: CurriculumConfig, eos_id: int, separator: Sequence[int],
                 prompt_ids=None):
        """`prompt_ids(k) -> token ids` of latent step k's prompt (None: no prompt)."""
        self.pieces, self.cfg, self.eos_id, self.separator = pieces, cfg, eos_id, list(separator)
        self.prompt_ids = prompt_ids

    @classmethod
    def from_records(cls, tokenized: Sequence[dict], tokenizer, cfg: CurriculumConfig,
                     prompt: str | None = None) -> "StepTargetCollator":
        """`prompt`: a template with {k}, the 1-based step (SIM-CoT's visualisation: "Step {k} of the solution")."""
        separator = tokenizer.encode(STEP_SEPARATOR, add_special_tokens=False)
        prompt_ids = None
        if prompt:
            cache: dict[int, list[int]] = {}

            def prompt_ids(k: int) -> list[int]:
                if k not in cache:
                    cache[k] = tokenizer.encode(prompt.format(k=k + 1), add_special_tokens=False)
                return cache[k]

        return cls(tokenize_step_pieces(tokenized, tokenizer), cfg, tokenizer.eos_token_id, separator, prompt_ids)

    def row_targets(self, feature: dict) -> list[list[int]]:
        idx = int(feature["idx"])
        if idx not in self.pieces:
            raise StepTargetError(f"training example idx {idx} has no record among the {len(self.pieces)} whose "
                                  f"step texts were tokenized")
        c, n_latents = self.cfg.thoughts_per_step, int(feature["n_latents"])
        if n_latents and (c == 0 or n_latents % c):
            raise StepTargetError(f"training example idx {idx}: {n_latents} latents are not whole steps of "
                                  f"c_thought {c}")
        pieces = self.pieces[idx]
        n_skipped = train_layout(len(pieces.steps), int(feature["stage"]), self.cfg)[0]
        return step_targets(pieces, n_skipped, n_latents // c if c else 0, self.cfg.max_latent_stage, self.separator)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        pairs = [(row, k, target) for row, f in enumerate(features) for k, target in enumerate(self.row_targets(f))]
        width = max((len(t) for _, _, t in pairs), default=0) + 1
        targets = torch.full((len(pairs), width), self.eos_id, dtype=torch.long)
        for i, (_, _, target) in enumerate(pairs):
            targets[i, :len(target)] = torch.as_tensor(target, dtype=torch.long)
        prompts = [self.prompt_ids(k) if self.prompt_ids else [] for _, k, _ in pairs]
        prompt_width = max((len(p) for p in prompts), default=0)
        prompt_tensor = torch.full((len(pairs), prompt_width), self.eos_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                prompt_tensor[i, prompt_width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        return {
            "step_targets": targets,
            "step_lengths": torch.tensor([len(t) for _, _, t in pairs], dtype=torch.long),
            "step_rows": torch.tensor([r for r, _, _ in pairs], dtype=torch.long),
            "step_index": torch.tensor([k for _, k, _ in pairs], dtype=torch.long),
            "step_prompts": prompt_tensor,
            "step_prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
        }

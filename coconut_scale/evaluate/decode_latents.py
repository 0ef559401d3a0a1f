"""Reading the latents back: decode every latent step of the prompts with the step decoder (SIM-CoT's interpretability use).

    coconut-scale decode-latents EXPORT DATA [--stage K] [--batch-size B] [--max-examples N] [--max-new-tokens T]
        [--out DIR]

EXPORT must hold its step decoder (trained with `coconut.step_supervision.export_decoder: true`: <EXPORT>/step_decoder/).
For each prompt (the evaluation prompt of --stage: question, markers, latents) the base model fills the latents,
then the decoder greedily decodes each latent step's c_thought thoughts, exactly the layout it was trained on
(model/step_supervision.py). The gold step is the training target of that step (data/step_targets.py: the step
text; the remaining steps joined at the last latent step; the answer where the record has fewer steps).

A `method: codi` export with its decoder (SIM-CoT on CODI) is read the same way, in its training layout "codi":
the prompt is CODI's evaluation prompt (question, bot, num_latent latents, eot; data/codi_features.py), the
student's latent passes feed prj(h) back as generation does, and step k = 0..num_latent decodes z_k alone (z_n:
prj of the state after the last latent, never fed back), positions from 0, no step prompt. The gold step is the
step training cuts from the record's teacher ids (data/codi_steps.py: each "<<...>>" span, the tail joined into
the last step, the teacher CoT without its last step unless codi.include_last_cot), taken whole (the dedup bug's
cut to a batch's row 0 is a batching artefact); a step training fills with [pad] has no target and no row.
Outputs in --out (default runs/<name>/eval/<export>/decode-latents-stage<K>/):
    decode_latents.json   per step k and overall: exact-match and mean token-F1 (whitespace tokens); every row
    decode_latents.txt    a readable table: example, step, gold, decoded
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import write_json_atomic, write_text_atomic
from coconut_scale.data.collate import left_pad_for_generation
from coconut_scale.data.codi_steps import get_steps, step_ids
from coconut_scale.data.step_targets import STEP_SEPARATOR, StepPieces, step_targets
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.inputs import add_common_args, check_common_args, default_out_dir, load_inputs
from coconut_scale.evaluate.runtime import InputError, quiet_libraries, say
from coconut_scale.model.export_meta import ExportFormatError, ExportMeta, StepDecoderMeta
from coconut_scale.model.step_supervision import StepSupervision
from coconut_scale.model.tokens import LatentTokens


def token_f1(gold: str, decoded: str) -> float:
    """SQuAD-style F1 over whitespace tokens (1.0 when both are empty)."""
    g, d = gold.split(), decoded.split()
    if not g and not d:
        return 1.0
    common = sum((Counter(g) & Counter(d)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(d), common / len(g)
    return 2 * precision * recall / (precision + recall)


def latent_states(model, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts' latent passes as generation runs them: (the filled input embeddings, CODI's z_n or None)."""
    codi = model.part("codi")
    if codi is not None:
        return codi.prompt_thoughts(model, input_ids, attention_mask, position_ids)
    with torch.no_grad():
        return model(input_ids, attention_mask, position_ids=position_ids).inputs_embeds, None


class StepGolds:
    """Per example, the training target of each latent step the decoder reads (None: the step has none)."""

    def __init__(self, part: StepSupervision, tokenizer, max_latent_stage: int):
        self.part, self.tokenizer, self.max_latent_stage = part, tokenizer, max_latent_stage
        self.eos = tokenizer.eos_token_id
        if part.layout == "codi":  # the cut of data/codi_steps.py, with the ids training cuts at
            self.codi_ids = step_ids(tokenizer, self.eos, LatentTokens.from_tokenizer(tokenizer).pad_id)
        else:
            self.separator = tokenizer.encode(STEP_SEPARATOR, add_special_tokens=False)

    def __call__(self, example: dict) -> list[list[int] | None]:
        n_steps = self.part.steps_of(example["n_latents"])
        if self.part.layout == "codi":
            # The row's own steps (what a batch of this record alone trains on): step k without its eos; a [pad]
            # step is no pair in training, so nothing to score.
            steps = get_steps([example["teacher_input_ids"]], n_steps, self.codi_ids)[0]
            return [None if s == [self.codi_ids.pad_id] else s[:-1] for s in steps]
        answer = example["answer_ids"]
        pieces = StepPieces(tuple(tuple(self.tokenizer.encode(s, add_special_tokens=False))
                                  for s in example.get("steps", [])),
                            tuple(answer[:-1] if answer[-1:] == [self.eos] else answer))
        return list(step_targets(pieces, example["n_skipped_steps"], n_steps, self.max_latent_stage, self.separator))


def decode_examples(model, tokenizer, examples, max_latent_stage: int, batch_size: int, max_new_tokens: int,
                    prompt: str | None) -> list[dict]:
    """One row per (example, latent step with a training target): gold and decoded text, exact match, token F1.
    `model`: a Coconut (or a CODI student) with its StepSupervision part (model.loading.attach_step_decoder)."""
    part = model.part(StepSupervision.name)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    golds_of = StepGolds(part, tokenizer, max_latent_stage)
    if part.layout == "codi":
        prompt = None  # SIM-CoT's CODI variant reads no step prompt (model/step_supervision.py layout_inputs)
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        golds = [golds_of(e) for e in chunk]
        pairs = [(r, k) for r in range(len(chunk)) for k, gold in enumerate(golds[r]) if gold is not None]
        if not pairs:
            continue
        ids, mask, pos = (t.to(device) for t in left_pad_for_generation([e["input_ids"] for e in chunk], model.eos_token_id))
        filled, last_thought = latent_states(model, ids, mask, pos)
        steps = torch.tensor([k for _, k in pairs], device=device)
        prompts = prompt_lengths = None
        if prompt:
            texts = [tokenizer.encode(prompt.format(k=k + 1), add_special_tokens=False) for _, k in pairs]
            width = max(len(t) for t in texts)
            prompts = torch.full((len(pairs), width), eos, dtype=torch.long, device=device)
            for i, t in enumerate(texts):
                prompts[i, width - len(t):] = torch.tensor(t, device=device)
            prompt_lengths = torch.tensor([len(t) for t in texts], device=device)
        decoded = part.decode_steps(model, ids, filled, torch.tensor([r for r, _ in pairs], device=device), steps,
                                    eos, max_new_tokens, prompts, prompt_lengths, last_thought)
        for (r, k), tokens in zip(pairs, decoded):
            gold, text = tokenizer.decode(golds[r][k]).strip(), tokenizer.decode(tokens).strip()
            rows.append({"idx": chunk[r]["idx"], "step": k, "gold": gold, "decoded": text, "exact": gold == text,
                         "token_f1": token_f1(gold, text)})
    return rows


def summarize(rows: list[dict]) -> dict:
    def rates(part):
        return {"n": len(part), "exact_match": sum(r["exact"] for r in part) / max(len(part), 1),
                "token_f1": sum(r["token_f1"] for r in part) / max(len(part), 1)}

    return {"overall": rates(rows), "per_step": [{"step": k, **rates([r for r in rows if r["step"] == k])}
                                                 for k in sorted({r["step"] for r in rows})]}


def format_table(rows: list[dict], summary: dict, width: int = 60) -> str:
    def cut(text):
        text = text.replace("\n", " \\n ")
        return text if len(text) <= width else text[:width - 3] + "..."

    lines = [f"{'idx':>5}  {'step':>4}  {'ok':>2}  {'f1':>4}  {'gold':<{width}}  decoded",
             f"{'-' * 5}  {'-' * 4}  {'-' * 2}  {'-' * 4}  {'-' * width}  {'-' * width}"]
    for r in rows:
        lines.append(f"{r['idx']:>5}  {r['step'] + 1:>4}  {'=' if r['exact'] else ' ':>2}  {r['token_f1']:4.2f}  "
                     f"{cut(r['gold']):<{width}}  {cut(r['decoded'])}")
    lines.append("")
    for s in summary["per_step"]:
        lines.append(f"step {s['step'] + 1}: exact match {s['exact_match']:.3f}  token F1 {s['token_f1']:.3f}  "
                     f"({s['n']} latent steps)")
    o = summary["overall"]
    lines.append(f"all:    exact match {o['exact_match']:.3f}  token F1 {o['token_f1']:.3f}  ({o['n']} latent steps)")
    return "\n".join(lines) + "\n"


def check_step_decoder(checkpoint: str | Path) -> StepDecoderMeta:
    """The export's StepDecoderMeta; a CODI export without one is told what trains and exports a decoder."""
    try:
        return StepDecoderMeta.read(checkpoint)
    except ExportFormatError as missing:
        try:
            method = ExportMeta.read(checkpoint).method
        except ExportFormatError:
            raise missing from None
        if method != "codi":
            raise
        raise InputError(f"{missing}; for a method codi export that is SIM-CoT on CODI: train with "
                         f"coconut.step_supervision.enabled: true and coconut.step_supervision.export_decoder: "
                         f"true") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale decode-latents", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(max_new_tokens=48)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from coconut_scale.model.loading import attach_step_decoder

    args = parse_args(argv)
    check_common_args(args)
    quiet_libraries()
    dist.init_for_inference()
    check_step_decoder(args.checkpoint)  # before the base model loads: a missing decoder fails fast
    inputs = load_inputs(args.checkpoint, args.data, args.stage, args.max_examples, args.max_seq_len, args.dtype)
    if max(ex["n_latents"] for ex in inputs.examples) == 0:
        raise InputError(f"stage {inputs.stage} prompts hold no latents; there is nothing to decode (--stage >= 1)")
    model, step = attach_step_decoder(inputs.model, inputs.checkpoint, args.dtype)
    model.to(dist.device()).eval()
    rows = decode_examples(model, inputs.tokenizer, inputs.examples, inputs.curriculum.max_latent_stage,
                           args.batch_size, args.max_new_tokens, step.prompt)
    summary = summarize(rows)
    out = Path(args.out) if args.out else default_out_dir(inputs.checkpoint, "decode-latents", inputs.stage)
    table = format_table(rows, summary)
    if dist.is_main():
        write_json_atomic(out / "decode_latents.json", {"checkpoint": str(inputs.checkpoint), "data": str(inputs.data),
                                                        "stage": inputs.stage, **summary, "rows": rows})
        write_text_atomic(out / "decode_latents.txt", table)
    say(table.rstrip().splitlines()[-1])
    say(f"-> {out}")
    dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

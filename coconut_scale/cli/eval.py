"""Generation accuracy of an exported Coconut checkpoint on a data file, batched and sharded across ranks.

    coconut-scale eval CHECKPOINT DATA [--stage K] [--batch-size B] [--max-examples N] [--out DIR]
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m coconut_scale eval CHECKPOINT DATA ...
    (python -m coconut_scale.eval ... is the same command)

CHECKPOINT is an HF export (runs/<name>/hf/{stage0,...,best}); DATA a question/steps/answer file (JSON array
or JSON Lines). Prompts are built as training evaluates them at stage K (default: the checkpoint's stage).
Writes into --out (default runs/<name>/eval/<export>/generation-stage<K>/):
    report.json    accuracy, cot_exact_match, mean_new_tokens (language tokens up to EOS), mean_latents,
                   mean_tokens (latents + language tokens: the paper's "# tokens"), examples_per_s, settings
    samples.jsonl  one line per example: generated text, predicted and gold answer, correct, token counts
    tokens.png     generated tokens per example, correct vs wrong
"""

from __future__ import annotations

import argparse
import sys

from coconut_scale import distributed as dist
from coconut_scale.evaluate.inputs import add_common_args, check_common_args, open_inputs
from coconut_scale.atomic_files import write_json_atomic, write_jsonl_atomic
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.runtime import (
    new_figure,
    progress,
    save_png,
    say,
)
from coconut_scale.evaluate.generation import generate_and_score


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_common_args(parser)
    return parser.parse_args(argv)


def tokens_figure(rows: list[dict], title: str):
    fig, (ax,) = new_figure(1)
    right = [r["n_new_tokens"] + r["n_latents"] for r in rows if r["correct"]]
    wrong = [r["n_new_tokens"] + r["n_latents"] for r in rows if not r["correct"]]
    counts = right + wrong or [0]
    bins = [b - 0.5 for b in range(min(counts), max(counts) + 2)]  # one bar per integer count, centred on it
    ax.hist([right, wrong], bins=bins, stacked=True, label=[f"correct ({len(right)})", f"wrong ({len(wrong)})"],
            color=["tab:green", "tab:red"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tokens per example (latents + generated up to EOS)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    ax.legend()
    return fig


def main(argv=None) -> int:
    args = parse_args(argv)
    check_common_args(args)
    inputs, out = open_inputs(args, "generation")
    n_batches = -(-len(inputs.examples[dist.rank()::dist.world_size()]) // args.batch_size)
    bar = progress(n_batches, f"eval stage {inputs.stage}")
    result = generate_and_score(inputs.model, inputs.examples, inputs.tokenizer, args.batch_size, args.max_new_tokens,
                                dist.device(), progress=bar)
    bar.close()
    rows = result.pop("rows")
    report = {
        **result,
        "stage": inputs.stage,
        "checkpoint": str(inputs.checkpoint),
        "checkpoint_stage": inputs.config.get("stage"),
        "data": str(inputs.data),
        "mode": inputs.curriculum.mode,
        "c_thought": inputs.curriculum.c_thought,
        "feedback": inputs.model.feedback,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "world_size": dist.world_size(),
        "n_dropped_too_long": inputs.n_dropped,
        # Rows that hit --max-new-tokens without an EOS: raise the budget if this is not 0.
        "n_truncated": sum(1 for r in rows if not r["stopped_at_eos"]),
    }
    if dist.is_main():
        write_json_atomic(out / "report.json", report)
        write_jsonl_atomic(out / "samples.jsonl", rows)
        title = f"{inputs.checkpoint.name} stage {inputs.stage}: accuracy {report['accuracy']:.3f}"
        save_png(tokens_figure(rows, title), out / "tokens.png")
    say(f"stage {inputs.stage}: accuracy {report['accuracy']:.4f}  cot_exact_match {report['cot_exact_match']:.4f}  "
        f"# tokens {report['mean_tokens']:.2f} ({report['mean_latents']:.2f} latents + {report['mean_new_tokens']:.2f} "
        f"generated)  {report['examples_per_s']:.1f} examples/s  ({report['n_examples']} examples, "
        f"{dist.world_size()} rank(s)) -> {out}")
    dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

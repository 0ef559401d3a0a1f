"""A memory-roofline model of one latent pass on a GPU, for every shipped recipe: bytes moved, predicted share.

A one-column latent pass does B rows of matmul work against every weight of the decoder, so on a GPU it is bound
by the bytes it moves, not by its FLOPs. Per rank, per latent pass (B = micro batch, one column):

  weights read        decoder linear weights, once in forward and once in backward (the input gradient): 2 x W
                      bytes (W: the linears' weights in the model dtype; LoRA adapters' weights alike). "before" also
                      counts a checkpointing recompute of the pass's layers (3 x W); "after", a one-column pass runs
                      once under checkpointing too (model/column_pass.py): 2 x W, except under ZeRO-3, which still
                      recomputes it (3 x W).
  gradients (before)  per trainable linear weight, a full-size gradient written by a rank-B product, then added into
                      the accumulated gradient (read both, write one): 4 x G bytes (G: trainable linear weights)
  gradients (after)   with the deferral (model/deferred_grad.py) the pass keeps [B, in] + [B, out] rows per linear
                      and one matmul over all latent passes' rows writes each gradient once: 4 x G / latents per pass.
                      ZeRO-3 recipes do not defer (their weights are gathered only while their module runs): after =
                      before there.

The step is predicted compute-bound: the FLOPs it must do (step_timing.step_flops, plus the checkpointing
recompute's forward, below ZeRO-3 not of the one-column passes) at MFU x the measured bf16 matmul rate; the latent
passes' bytes at the measured copy rate are added on top. This is a floor: the first GPU run measured ~0.5 s forward / ~0.75 s backward per latent pass of
llama8b LoRA under ZeRO-3, far above any byte count, because ZeRO-3's per-module hooks dominate a one-column pass.

    python benchmarks/latent_pass_bytes.py        # table + results/latent_pass_bytes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from step_timing import step_flops  # noqa: E402

from coconut_scale.atomic_files import write_json_atomic  # noqa: E402
from coconut_scale.config.recipe import load_recipe  # noqa: E402
from coconut_scale.model.shapes import dims, linear_shapes, shape_for  # noqa: E402

# The H200 of docs/benchmarks.md "The first GPU run" (FACTS.md): measured bf16 matmul and device copy rates.
MATMUL_TFLOPS = 780.0
COPY_TBPS = 4.3
MFU = 0.45  # the GPU kit's MFU target
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def recipe_model(path: Path) -> dict:
    recipe = load_recipe(path, [])
    shape = shape_for(recipe.model.name_or_path) if not recipe.model.from_config else None
    if shape is None:
        return {"recipe": path.stem, "skipped": f"model {recipe.model.name_or_path!r} has no known shape"}
    d = dims(shape)
    layout = linear_shapes(shape)
    per_layer = sum(i * o for mods in layout.values() for i, o in mods)
    lora = recipe.lora.enabled
    targets = recipe.lora_targets() if lora else None
    trainable = (sum(recipe.lora.rank * (i + o) for t in targets for i, o in layout[t]) if lora else per_layer) * d.layers
    wbytes = DTYPE_BYTES[recipe.model.dtype]
    gbytes = 4 if lora else wbytes  # adapters keep fp32 weights and gradients; a full fine-tune its model dtype
    latents = recipe.coconut.c_thought * recipe.coconut.max_latent_stage
    micro, seq = recipe.batch.micro_batch_size, recipe.data.max_seq_len
    ckpt = recipe.model.gradient_checkpointing
    zero3 = "zero3" in Path(recipe.deepspeed.config).name
    one_read = per_layer * d.layers * wbytes + (trainable * gbytes if lora else 0)
    reads_before = (3 if ckpt else 2) * one_read
    reads_after = reads_before if zero3 else 2 * one_read  # ZeRO-3 recomputes the one-column passes
    grads_before = 4 * trainable * gbytes
    grads_after = grads_before if zero3 else grads_before / max(1, latents)
    flops = step_flops(shape, micro, seq, recipe.lora.rank if lora else None, targets)
    if ckpt:  # the recompute's forward of the decoder linears (below ZeRO-3 not over the one-column passes)
        flops += 2 * micro * (seq if zero3 else max(seq - latents, 0)) * (per_layer * d.layers)
    step_s = flops / (MFU * MATMUL_TFLOPS * 1e12)
    out = {"recipe": path.stem, "model": recipe.model.name_or_path, "lora": lora, "zero3": zero3, "dtype": recipe.model.dtype,
           "micro_batch": micro, "seq": seq, "latents": latents, "checkpointing": ckpt,
           "weights_read_gb_before": reads_before / 1e9, "weights_read_gb_after": reads_after / 1e9,
           "grads_before_gb": grads_before / 1e9, "grads_after_gb": grads_after / 1e9, "predicted_step_s": step_s}
    for when, reads, grads in (("before", reads_before, grads_before), ("after", reads_after, grads_after)):
        pass_s = (reads + grads) / (COPY_TBPS * 1e12)
        out[f"pass_ms_{when}"] = pass_s * 1e3
        out[f"latent_share_{when}"] = latents * pass_s / (step_s + latents * pass_s) if latents else 0.0
    return out


def table(rows: list[dict]) -> str:
    lines = ["| recipe | train | micro x seq | latents | weights read GB/pass before -> after | grads GB/pass before -> after "
             "| ms/pass before -> after | predicted step s | latent share before -> after |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['recipe']} | {r['skipped']} | | | | | | | |")
            continue
        train = ("LoRA" if r["lora"] else "full") + (", ZeRO-3" if r["zero3"] else "") + f", {r['dtype']}"
        lines.append(f"| {r['recipe']} | {train} | {r['micro_batch']} x {r['seq']} | {r['latents']} "
                     f"| {r['weights_read_gb_before']:.2f} -> {r['weights_read_gb_after']:.2f} "
                     f"| {r['grads_before_gb']:.2f} -> {r['grads_after_gb']:.2f} "
                     f"| {r['pass_ms_before']:.2f} -> {r['pass_ms_after']:.2f} | {r['predicted_step_s']:.3f} "
                     f"| {r['latent_share_before']:.1%} -> {r['latent_share_after']:.1%} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latent_pass_bytes.json")
    args = p.parse_args(argv)
    rows = [recipe_model(f) for f in sorted((REPO / "recipes").glob("*.yaml"))]
    text = table(rows)
    print(text)
    write_json_atomic(args.out, {"benchmark": "latent_pass_bytes", "assumptions": {
        "matmul_tflops": MATMUL_TFLOPS, "copy_tbps": COPY_TBPS, "mfu": MFU}, "recipes": rows, "table_markdown": text})


if __name__ == "__main__":
    main()

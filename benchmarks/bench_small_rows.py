"""What a one-column pass's matmuls cost on this CPU: a linear at a few rows against reading its weight once.

A one-column latent pass multiplies every decoder weight by B rows (the batch, one column each) in forward and
again for the input gradient. Those products carry the same FLOPs the fair floor spends on the same tokens
inside its full-width products, so what they cost beyond that share is the kernel's price for few rows; their
floor is the weight read (they are memory-bound by arithmetic intensity: 2 B FLOPs per 4-byte weight).

Per weight shape of bench_fair_floor's decoders (GPT-2-small 12 x 768, Llama-shaped 8 x 512), fp32, one
thread: the time to read the weight once (`W.sum()`), `x @ W.T` and `g @ W` at 1, 8 and 16 rows, and 1/200 of
the same product over 1600 rows (the floor's price for 8 of its rows). Enough distinct weights are cycled
(> 2 x the last-level cache) that every call reads its weight from memory, as a pass through the model does.
Then, per shape, one one-column pass's products (forward + input gradient, every decoder linear) summed three
ways: at the measured 8-row price, at the weight-read floor, and at the full-width share.

    python benchmarks/bench_small_rows.py          # -> results/bench_small_rows.json, a table on stdout
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_fair_floor import SHAPES  # noqa: E402
from bench_overhead import build_model  # noqa: E402

from coconut_scale.atomic_files import write_json_atomic  # noqa: E402
from coconut_scale.model.activation_checkpointing import decoder_layers  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_small_rows.json"
CYCLED_BYTES = 96 * 2**20  # > 2 x this machine's 32 MiB L3: each call's weight comes from memory
ROWS = 8  # bench_fair_floor's batch: a one-column pass's rows
DECODER_SHAPES = [s for s in SHAPES if s.name in ("gpt2-small 12x768", "llama 8x512")]
assert all(s.batch == ROWS for s in DECODER_SHAPES), "the columns below are named for 8-row passes"


def decoder_linears(shape) -> tuple[int, list[tuple[tuple[int, int], int]]]:
    """The shape's layer count and ((in, out), count per layer) of every linear in a layer, read off the model
    bench_fair_floor builds (on the meta device: no weights are made)."""
    with torch.device("meta"):
        model, _ = build_model(shape)
    layers = decoder_layers(model)
    counts: dict[tuple[int, int], int] = {}
    for module in layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":  # GPT-2's: weight [in, out]
            key = tuple(module.weight.shape)
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return len(layers), list(counts.items())


def per_call_ms(fn, weights: list[torch.Tensor], calls: int) -> float:
    """Median over 5 batches of `calls` calls, each on the next weight of the cycle."""
    for w in weights[:4]:
        fn(w)
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            fn(weights[i % len(weights)])
        batches.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(batches)


def measure(fan_in: int, fan_out: int, full_rows: int, calls: int) -> dict:
    count = max(8, CYCLED_BYTES // (fan_in * fan_out * 4))
    weights = [torch.randn(fan_out, fan_in) for _ in range(count)]
    row = {"in": fan_in, "out": fan_out, "weight_mib": fan_in * fan_out * 4 / 2**20,
           "read_ms": per_call_ms(lambda w: w.sum(), weights, calls)}
    for rows in (1, 8, 16):
        x, g = torch.randn(rows, fan_in), torch.randn(rows, fan_out)
        row[f"forward_{rows}_ms"] = per_call_ms(lambda w: torch.nn.functional.linear(x, w), weights, calls)
        row[f"input_grad_{rows}_ms"] = per_call_ms(lambda w: g.mm(w), weights, calls)
    x, g = torch.randn(full_rows, fan_in), torch.randn(full_rows, fan_out)
    full_forward = per_call_ms(lambda w: torch.nn.functional.linear(x, w), weights, max(2, calls // 50))
    full_grad = per_call_ms(lambda w: g.mm(w), weights, max(2, calls // 50))
    row["full_width_share_8_ms"] = (full_forward + full_grad) * ROWS / full_rows  # forward + input gradient
    row["gflops_8"] = 2 * ROWS * fan_in * fan_out / (row["forward_8_ms"] * 1e6)
    row["gflops_full"] = 2 * full_rows * fan_in * fan_out / (full_forward * 1e6)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls per timed batch at few rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    lines = ["| decoder | in x out | weight MiB | read ms | fwd 1 / 8 / 16 rows ms | input grad 1 / 8 / 16 rows ms "
             "| 8 rows / read (fwd) | GFLOP/s 8 rows / full width |", "|---|---|---:|---:|---|---|---:|---|"]
    passes, shapes = [], {}
    for shape in DECODER_SHAPES:
        name, full_rows = shape.name, shape.batch * shape.seq_len
        layers, linears = decoder_linears(shape)
        measured, at_8, at_read, at_share = [], 0.0, 0.0, 0.0
        for (fan_in, fan_out), per_layer in linears:
            r = measure(fan_in, fan_out, full_rows, args.calls)
            measured.append(r)
            at_8 += layers * per_layer * (r["forward_8_ms"] + r["input_grad_8_ms"])
            at_read += layers * per_layer * 2 * r["read_ms"]
            at_share += layers * per_layer * r["full_width_share_8_ms"]
            lines.append(f"| {name} | {fan_in} x {fan_out} | {r['weight_mib']:.1f} | {r['read_ms']:.3f} "
                         f"| {r['forward_1_ms']:.3f} / {r['forward_8_ms']:.3f} / {r['forward_16_ms']:.3f} "
                         f"| {r['input_grad_1_ms']:.3f} / {r['input_grad_8_ms']:.3f} / {r['input_grad_16_ms']:.3f} "
                         f"| {r['forward_8_ms'] / r['read_ms']:.1f}x | {r['gflops_8']:.0f} / {r['gflops_full']:.0f} |")
        shapes[name] = {"layers": layers, "linears": measured}
        passes.append({"decoder": name, "one_pass_8_rows_ms": at_8, "one_pass_weight_read_ms": at_read,
                       "one_pass_full_width_share_ms": at_share})
    lines += ["", "| decoder | one one-column pass at 8 rows, forward + input grad: measured ms | at the weight-read "
              "floor (2 reads) ms | the floor step's price for the same rows ms |", "|---|---:|---:|---:|"]
    lines += [f"| {p['decoder']} | {p['one_pass_8_rows_ms']:.1f} | {p['one_pass_weight_read_ms']:.1f} "
              f"| {p['one_pass_full_width_share_ms']:.1f} |" for p in passes]
    table = "\n".join(lines)
    print(table)
    write_json_atomic(args.out, {
        "benchmark": "bench_small_rows",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                        "blas": "mkl" if torch.backends.mkl.is_available() else "other"},
        "shapes": shapes, "one_column_pass": passes, "table_markdown": table})


if __name__ == "__main__":
    main()

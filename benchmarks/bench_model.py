"""Fast path vs reference: train step (forward+backward) and generation throughput, with peak memory.

A GPT-2-small-shaped model (12 layers, 768 hidden, 12 heads, vocab 50257+3, random init, fp32) on CPU.

  training:   batch 8, 200 tokens, 6 latents per row (question | <start> | 6 x <latent> | <end> | answer),
              loss.backward() included; variants: fast path (`Coconut`), fast path with latent-safe layer
              checkpointing, and `reference_forward` (one full recompute per latent).
  generation: batch 16, prompt question (48-64 tokens) | <start> | 6 x <latent> | <end>, exactly 32 new tokens
              (EOS stop disabled with eos_id=-1, never an argmax); fast path = one batched `Coconut.generate` call,
              reference = the sum over the 16 rows of batch-1 `reference_generate` (the official behaviour).

Timing: one warm-up call per variant, then `--repeats` rounds in which the variants run back to back, the order
rotating every round (A/B, B/A, ...) so machine noise hits every variant alike; medians are reported.
Peak memory: before any timing, every variant runs once in a fresh subprocess (`--variant NAME`), which builds
the model and data, notes its RSS (the baseline), resets the kernel's high-water mark (/proc/self/clear_refs)
and reports the peak RSS (VmHWM) over one run of the workload, so no variant inherits another's high-water mark
(reference generation: its longest row, since the 16 batch-1 calls run one after another and free in between).

This is a measurement, not a test: it prints a markdown table and writes JSON (all raw timings, config, versions).

    python benchmarks/bench_model.py --quick                  # tiny smoke configuration, seconds
    python benchmarks/bench_model.py --gen-repeats 3          # the full configuration: ~20 min on 2 quiet cores
                                                              # (over an hour when loaded), mostly the reference
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coconut_scale.model.activation_checkpointing import disable_latent_safe_checkpointing, enable_latent_safe_checkpointing  # noqa: E402
from coconut_scale.data.collate import left_pad_for_generation  # noqa: E402
from coconut_scale.model.coconut import Coconut  # noqa: E402
from coconut_scale.model.reference import reference_forward, reference_generate  # noqa: E402
from coconut_scale.model.tokens import LatentTokens  # noqa: E402
from coconut_scale.testing import latent_batch, latent_rows, spread_lengths  # noqa: E402

TRAIN_VARIANTS = ("train_fast", "train_fast_ckpt", "train_ref")
GEN_VARIANTS = ("gen_fast", "gen_ref")
TARGETS = {"train_fast": 3.0, "train_fast_ckpt": None, "gen_fast": 10.0}
LABELS = {
    "train_fast": "train: fast path",
    "train_fast_ckpt": "train: fast path + checkpointing",
    "train_ref": "train: reference",
    "gen_fast": "generate: fast path (batched, KV cache)",
    "gen_ref": "generate: reference (16 x batch-1, no cache)",
}
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_model.json"
QUICK = dict(layers=2, hidden=128, heads=2, batch=2, seq_len=48, latents=3, gen_batch=4, new_tokens=8,
             gen_question_len=16, answer_len=8, repeats=3, gen_repeats=3)


# -- setup -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=None, help="default: hidden // 64")
    p.add_argument("--vocab", type=int, default=50257 + 3, help="GPT-2 vocab + the 3 Coconut tokens (last 3 ids)")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--seq-len", type=int, default=200, help="training sequence length (padded width)")
    p.add_argument("--latents", type=int, default=6, help="latents per row (training and generation)")
    p.add_argument("--answer-len", type=int, default=24, help="training tokens after <end> (steps + answer + EOS)")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-question-len", type=int, default=64, help="longest generation question (rows vary -25%%)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed rounds for generation (default: --repeats)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (overrides the shape options)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    p.add_argument("--variant", choices=TRAIN_VARIANTS + GEN_VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        if args.out is None:
            args.out = DEFAULT_OUT.with_name("bench_model_quick.json")
    args.out = args.out or DEFAULT_OUT
    args.heads = args.heads or max(1, args.hidden // 64)
    args.gen_repeats = args.gen_repeats or args.repeats
    return args


def build_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    eos = args.vocab - 4  # GPT-2's <|endoftext|> sits just below the 3 added tokens
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab, n_positions=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    model.train()  # dropout is 0, so train mode costs nothing extra and keeps fast == reference
    tokens = LatentTokens(start_id=args.vocab - 3, latent_id=args.vocab - 2, end_id=args.vocab - 1, eos_id=eos, pad_id=eos)
    return model, tokens


def train_batch(args, tokens):
    """Collated layout: rows left-aligned on their first latent (left padding), right-padded at the end."""
    longest_q = args.seq_len - (args.latents + 2) - args.answer_len
    if longest_q < 1:
        raise SystemExit("--seq-len too short for --latents and --answer-len")
    lengths = spread_lengths(args.batch, longest_q)
    return latent_batch(tokens, [args.latents] * args.batch, lengths, answer_len=args.answer_len - 1,
                        seed=args.seed + 1, vocab=range(args.vocab - 4))


def gen_prompts(args, tokens):
    """Returns (unpadded rows for the reference, left-padded ids + mask for the fast path)."""
    lengths = spread_lengths(args.gen_batch, args.gen_question_len)
    rows = [r["input_ids"] for r in latent_rows(tokens, [args.latents] * args.gen_batch, lengths, answer_len=None,
                                                 seed=args.seed + 2, vocab=range(args.vocab - 4))]
    ids, mask, _ = left_pad_for_generation(rows, tokens.pad_id)
    return [torch.tensor([r]) for r in rows], ids, mask


class Bench:
    """Model, data and one callable per variant (each runs the full workload once)."""

    NO_EOS = -1  # never an argmax, so both paths generate exactly --new-tokens tokens

    def __init__(self, args):
        self.args = args
        self.model, self.tokens = build_model(args)
        t = self.tokens
        self.coconut = Coconut(self.model, t.latent_id, t.start_id, t.end_id, self.NO_EOS)
        self.train_data = train_batch(args, t)
        self.gen_rows, self.gen_ids, self.gen_mask = gen_prompts(args, t)

    # training -------------------------------------------------------------------------------------------
    def _train(self, fn):
        self.model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return float(loss.detach())

    def train_fast(self):
        ids, mask, labels, pos = self.train_data
        return self._train(lambda: self.coconut(ids, mask, labels, pos).loss)

    def train_fast_ckpt(self):
        enable_latent_safe_checkpointing(self.model)
        try:
            return self.train_fast()
        finally:
            disable_latent_safe_checkpointing(self.model)

    def train_ref(self):
        ids, mask, labels, pos = self.train_data
        lat = self.tokens.latent_id
        return self._train(lambda: reference_forward(self.model, ids, mask, labels, pos, lat)[0])

    # generation -----------------------------------------------------------------------------------------
    def gen_fast(self):
        out = self.coconut.generate(self.gen_ids, self.gen_mask, max_new_tokens=self.args.new_tokens)
        return out[:, self.gen_ids.shape[1] :]

    def gen_ref(self, rows=None):
        new = []
        for row in self.gen_rows if rows is None else rows:
            out = reference_generate(self.model, row, self.tokens.latent_id, self.NO_EOS, self.args.new_tokens)
            new.append(out[0, row.shape[1] :])
        return torch.stack(new)

    def run(self, name):
        return getattr(self, name)()


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak-RSS high-water mark (VmHWM, and ru_maxrss with it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# -- measurement ---------------------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def interleaved(bench, variants, repeats, log):
    """Rotate the order every round: round r starts at variant r mod n (A/B, B/A, ... for two).

    Returns the times and each variant's last result."""
    times, last = {v: [] for v in variants}, {}
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            dt, last[v] = timed(lambda: bench.run(v))
            times[v].append(dt)
            log(f"  round {r + 1}/{repeats} {v:16s} {dt:8.3f} s")
    return times, last


def memory_in_subprocess(args, variant):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--threads", str(args.threads)]
    for opt in ("layers", "hidden", "heads", "vocab", "batch", "seq_len", "latents", "answer_len", "gen_batch",
                "new_tokens", "gen_question_len", "seed"):
        cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def variant_main(args):
    """Child process: build everything, reset the high-water mark, run the variant's workload once, report the peak.

    gen_ref runs only the longest prompt: the 16 batch-1 generations run one after another and free everything
    in between, so their peak is the longest row's (and 16 rows would cost 16x the time for the same number).
    """
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    process_peak_setup = peak_rss_mb()
    baseline = current_rss_mb()
    reset = reset_peak_rss()
    if args.variant == "gen_ref":
        longest = max(bench.gen_rows, key=lambda r: r.shape[1])
        seconds, _ = timed(lambda: bench.gen_ref([longest]))
    else:
        seconds, _ = timed(lambda: bench.run(args.variant))
    print(json.dumps({
        "variant": args.variant, "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(),
        "peak_rss_is_workload_only": reset, "setup_peak_rss_mb": process_peak_setup, "seconds": seconds,
        "workload": "longest prompt only" if args.variant == "gen_ref" else "full",
    }))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        return variant_main(args)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    memory = {}
    if not args.no_memory:  # first, while this process holds nothing big (the reference peaks at many GB)
        for v in TRAIN_VARIANTS + GEN_VARIANTS:
            log(f"peak RSS subprocess: {v}")
            memory[v] = memory_in_subprocess(args, v)
            log(f"  {memory[v]}")

    bench = Bench(args)
    ids = bench.train_data[0]
    log(f"model: {args.layers} layers, {args.hidden} hidden, {sum(p.numel() for p in bench.model.parameters()) / 1e6:.1f}M "
        f"params; train batch {tuple(ids.shape)}, gen prompts {tuple(bench.gen_ids.shape)}; threads {torch.get_num_threads()}")

    # Warm-up, doubling as a correctness check of what is being timed.
    checks = {}
    t_fast, loss_fast = timed(bench.train_fast)
    t_ckpt, loss_ckpt = timed(bench.train_fast_ckpt)
    t_ref, loss_ref = timed(bench.train_ref)
    log(f"warm-up train: fast {t_fast:.2f}s ckpt {t_ckpt:.2f}s ref {t_ref:.2f}s; losses {loss_fast:.6f} {loss_ckpt:.6f} {loss_ref:.6f}")
    checks["train_loss"] = {"fast": loss_fast, "fast_ckpt": loss_ckpt, "reference": loss_ref}
    t_gf, new_fast = timed(bench.gen_fast)
    t_gr, new_ref1 = timed(lambda: bench.gen_ref(bench.gen_rows[-1:]))  # one row: warm-up only, the full set is slow
    log(f"warm-up generate: fast {t_gf:.2f}s (batch {args.gen_batch}), ref {t_gr:.2f}s (1 row)")
    assert new_fast.shape == (args.gen_batch, args.new_tokens), new_fast.shape

    log("training rounds:")
    train_times, _ = interleaved(bench, list(TRAIN_VARIANTS), args.repeats, log)
    log("generation rounds:")
    gen_times, last = interleaved(bench, list(GEN_VARIANTS), args.gen_repeats, log)
    new_fast, new_ref = last["gen_fast"], last["gen_ref"]
    assert new_ref.shape == new_fast.shape, (new_ref.shape, new_fast.shape)
    checks["generation"] = {
        "new_tokens_per_row": args.new_tokens,
        "rows_identical_fast_vs_reference": int((new_ref == new_fast).all(dim=1).sum()),
        "rows": args.gen_batch,
        "token_agreement": float((new_ref == new_fast).float().mean()),
    }

    times = {**train_times, **gen_times}
    train_tokens = ids.numel()
    gen_tokens = args.gen_batch * args.new_tokens
    rows = []
    for v in TRAIN_VARIANTS + GEN_VARIANTS:
        ref = "train_ref" if v.startswith("train") else "gen_ref"
        med = median(times[v])
        paired = [r / f for r, f in zip(times[ref], times[v])]
        target = TARGETS.get(v)
        speedup = median(times[ref]) / med
        rows.append({
            "variant": v,
            "label": LABELS[v],
            "median_s": med,
            "tokens": train_tokens if v.startswith("train") else gen_tokens,
            "tokens_per_s": (train_tokens if v.startswith("train") else gen_tokens) / med,
            "speedup_vs_reference": speedup,
            "median_paired_speedup": median(paired),
            "peak_rss_mb": memory.get(v, {}).get("peak_rss_mb"),
            "peak_rss_over_baseline_mb": (memory[v]["peak_rss_mb"] - memory[v]["baseline_rss_mb"]) if v in memory else None,
            "target_speedup": target,
            "met": None if target is None else speedup >= target,
        })

    table = format_table(rows, args)
    print(table)
    result = {
        "benchmark": "bench_model",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "variant"},
        "shapes": {"train_input": list(ids.shape), "train_real_tokens": int(bench.train_data[1].sum()),
                   "gen_prompt": list(bench.gen_ids.shape), "gen_new_tokens": args.new_tokens},
        "environment": {
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "processor": platform.processor(),
        },
        "method": "1 warm-up per variant (reference generation: 1 row), then rounds with rotating order; medians. "
                  "tokens/s: train = batch*seq_len per step, generate = gen_batch*new_tokens per batch. "
                  "peak RSS: VmHWM of a fresh subprocess, reset after building model and data, over one run of "
                  "the workload (gen_ref: its longest row); 'over baseline' subtracts the RSS right after setup.",
        "timings_s": times,
        "warmup_s": {"train_fast": t_fast, "train_fast_ckpt": t_ckpt, "train_ref": t_ref,
                     "gen_fast": t_gf, "gen_ref_one_row": t_gr},
        "memory": memory,
        "results": rows,
        "checks": checks,
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


def format_table(rows, args):
    head = ("| variant | median s | tokens/s | speedup vs reference | peak RSS MB (over baseline) | target | met? |\n"
            "|---|---:|---:|---:|---:|---:|:---:|")
    lines = [head]
    for r in rows:
        rss = "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_over_baseline_mb']:.0f})"
        target = "" if r["target_speedup"] is None else f">= {r['target_speedup']:g}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        sp = "1.00x (baseline)" if r["variant"] in ("train_ref", "gen_ref") else f"{r['speedup_vs_reference']:.2f}x"
        lines.append(f"| {r['label']} | {r['median_s']:.3f} | {r['tokens_per_s']:.1f} | {sp} | {rss} | {target} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

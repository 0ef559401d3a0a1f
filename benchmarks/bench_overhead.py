"""Coconut's extra cost over the same HF model doing the plain work on the same tokens (CPU).

The yardstick is the HF model itself: a Coconut train step over T tokens with n latents computes n one-column
passes plus the rest, so it should cost about one plain forward+backward over the same T tokens (the latents
fed to the plain model as ordinary tokens); latent generation should cost about one HF `generate` (with its
KV cache) on the same prompts plus n one-column passes.

  train:      Coconut (6 latents per row) vs the HF model's forward+backward with `labels`; both with
              checkpointing off, and on (Coconut: latent-safe layer checkpointing; plain: HF's own
              non-reentrant gradient checkpointing). Shapes: GPT-2-small (12 x 768, batch 8 x ~200 tokens)
              and 4 layers x 256 (batch 16 x ~200).
  generation: 16 prompts (48-64 tokens + 6 latents), exactly 32 new tokens (EOS disabled), Coconut.generate
              vs HF generate with cache; GPT-2-small shape.
  memory:     peak RSS of one train step per variant, each in a fresh subprocess, over the RSS right after
              building model and data: GPT-2-small at GPT-2's vocabulary (50257 + 3) and a Llama-shaped model
              (2 x 256) at Llama-3's (128256), 8 rows x ~490 tokens.
  --compare-rev REV: adds the Coconut wrapper as the package was at git revision REV (`git archive`) as a
              further variant of every train/generation pair, so before/after come from one interleaved run.

Timing: one warm-up per variant, then rounds in which the variants of a pair run back to back in alternating
order (A/B, B/A, ...); medians and the median of the per-round ratios. The 1/5/15-minute load averages
(`/proc/loadavg`, as `uptime` prints them) are recorded before and after, since the machine may be shared.

    python benchmarks/bench_overhead.py --quick         # tiny shapes, < 1 min -> results/bench_overhead_quick.json
    python benchmarks/bench_overhead.py                 # full -> results/bench_overhead.json
    python benchmarks/bench_overhead.py --compare-rev HEAD --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coconut_scale.atomic_files import write_json_atomic  # noqa: E402
from coconut_scale.data.collate import left_pad_for_generation  # noqa: E402
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing  # noqa: E402
from coconut_scale.model.coconut import Coconut  # noqa: E402
from coconut_scale.model.tokens import LatentTokens  # noqa: E402
from coconut_scale.testing import latent_batch, latent_rows, spread_lengths  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_overhead.json"
NO_EOS = -1  # never an argmax: both sides generate exactly new_tokens tokens


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # "gpt2" or "llama"
    layers: int
    hidden: int
    vocab: int  # including the 3 Coconut tokens (the last 3 ids)
    batch: int
    seq_len: int  # padded width of the training batch
    latents: int = 6
    answer_len: int = 24


TIME_SHAPES = (
    Shape("gpt2-small 12x768", "gpt2", 12, 768, 50257 + 3, 8, 200),
    Shape("4x256", "gpt2", 4, 256, 50257 + 3, 16, 200),
)
MEMORY_SHAPES = (
    Shape("gpt2-small 12x768, vocab 50260", "gpt2", 12, 768, 50257 + 3, 8, 200),
    Shape("llama 2x256, vocab 128256", "llama", 2, 256, 128256, 8, 490),
)
GEN = dict(batch=16, question_len=64, new_tokens=32)
QUICK_TIME = (Shape("quick 2x128", "gpt2", 2, 128, 2000, 4, 64, latents=3, answer_len=8),)
QUICK_MEMORY = (Shape("quick llama 2x128, vocab 32000", "llama", 2, 128, 32000, 4, 120, latents=3, answer_len=8),)
QUICK_GEN = dict(batch=4, question_len=16, new_tokens=8)


# -- model and data ------------------------------------------------------------------------------------------
def build_model(shape: Shape, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = shape.vocab - 4
    heads = max(1, shape.hidden // 64)
    if shape.arch == "gpt2":
        config = GPT2Config(n_layer=shape.layers, n_embd=shape.hidden, n_head=heads, vocab_size=shape.vocab,
                            n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), intermediate_size=4 * shape.hidden,
                             vocab_size=shape.vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                             bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        cls = LlamaForCausalLM
    config._attn_implementation = "sdpa"
    model = cls(config).train()  # dropout is 0: train mode changes nothing but is what training runs
    tokens = LatentTokens(start_id=shape.vocab - 3, latent_id=shape.vocab - 2, end_id=shape.vocab - 1,
                          eos_id=eos, pad_id=eos)
    return model, tokens


def train_batch(shape: Shape, tokens: LatentTokens, seed: int = 1) -> dict[str, torch.Tensor]:
    """question | <start> | latents | <end> | answer + EOS, collated as training collates (latents aligned)."""
    longest_q = shape.seq_len - (shape.latents + 2) - shape.answer_len
    return latent_batch(tokens, [shape.latents] * shape.batch, spread_lengths(shape.batch, longest_q),
                        answer_len=shape.answer_len - 1, seed=seed, vocab=range(shape.vocab - 4)).as_dict()


def gen_prompts(shape: Shape, tokens: LatentTokens, gen: dict, seed: int = 2):
    """Left-padded prompts: question | <start> | latents | <end>."""
    rows = latent_rows(tokens, [shape.latents] * gen["batch"], spread_lengths(gen["batch"], gen["question_len"]),
                       answer_len=None, seed=seed, vocab=range(shape.vocab - 4))
    ids, mask, _ = left_pad_for_generation([r["input_ids"] for r in rows], tokens.pad_id)
    return ids, mask


def coconut_class_at(rev: str):
    """The Coconut class as the package was at git revision `rev`: the whole package (`git archive`), imported
    under another name beside today's, so the wrapper and everything it imports (the loss, the cache) are `rev`'s."""
    name = "coconut_scale_at_" + re.sub(r"\W", "_", rev)
    root = Path(tempfile.mkdtemp(prefix="coconut_at_"))
    archive = subprocess.run(["git", "archive", rev, "coconut_scale"], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "coconut_scale").rename(root / name)
    for source in (root / name).rglob("*.py"):  # its absolute imports point at the renamed copy
        source.write_text(re.sub(r"\bcoconut_scale\b", name, source.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{name}.model.coconut").Coconut


# -- the workloads ---------------------------------------------------------------------------------------------
class Workloads:
    """One callable per variant; each runs one train step or one generation batch."""

    def __init__(self, shape: Shape, gen: dict | None, compare_rev: str | None):
        self.shape, self.gen = shape, gen
        self.model, self.tokens = build_model(shape)
        t = self.tokens
        self.coconut = Coconut(self.model, t.latent_id, t.start_id, t.end_id, NO_EOS)
        self.before = None
        if compare_rev:
            self.before = coconut_class_at(compare_rev)(self.model, t.latent_id, t.start_id, t.end_id, NO_EOS)
        self.batch = train_batch(shape, t)
        if gen:
            self.gen_ids, self.gen_mask = gen_prompts(shape, t, gen)
            self.model.generation_config.eos_token_id = None  # run to max_new_tokens, as Coconut with NO_EOS
            self.model.generation_config.pad_token_id = t.pad_id

    def _step(self, loss_fn) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    def _checkpointing(self, kind: str | None):
        """kind: None (off), "latent" (the harness's latent-safe checkpointing) or "hf" (HF's own)."""
        from coconut_scale.model.activation_checkpointing import disable_latent_safe_checkpointing

        disable_latent_safe_checkpointing(self.model)
        self.model.gradient_checkpointing_disable()
        if kind == "latent":
            enable_latent_safe_checkpointing(self.model)
        elif kind == "hf":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def run(self, variant: str):
        b = self.batch
        if variant.startswith("train_"):
            ckpt = variant.endswith("_ckpt")
            kind = variant.removesuffix("_ckpt").removeprefix("train_")
            self._checkpointing(("hf" if kind == "plain" else "latent") if ckpt else None)
            if kind == "plain":
                return self._step(lambda: self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                      position_ids=b["position_ids"], labels=b["labels"]).loss)
            wrapper = self.coconut if kind == "coconut" else self.before
            return self._step(lambda: wrapper(**b).loss)
        self._checkpointing(None)
        n = self.gen["new_tokens"]
        with torch.no_grad():
            if variant == "gen_plain":
                out = self.model.generate(input_ids=self.gen_ids, attention_mask=self.gen_mask, max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, use_cache=True)
            else:
                wrapper = self.coconut if variant == "gen_coconut" else self.before
                out = wrapper.generate(self.gen_ids, self.gen_mask, max_new_tokens=n)
        return list(out.shape)


GROUPS = {"train": ("train_plain", "train_coconut"), "train_ckpt": ("train_plain_ckpt", "train_coconut_ckpt"),
          "gen": ("gen_plain", "gen_coconut")}


def pairs(names, has_gen: bool, compare: bool) -> list[tuple[str, ...]]:
    """Groups of variants timed against each other; the first of each group is the yardstick."""
    groups = [GROUPS[n] for n in names if n != "gen" or has_gen]
    if compare:
        groups = [(*g, g[1].replace("coconut", "before")) for g in groups]
    return groups


# -- measurement -------------------------------------------------------------------------------------------------
def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def interleaved(work: Workloads, group: tuple[str, ...], repeats: int, log) -> dict[str, list[float]]:
    times = {v: [] for v in group}
    for v in group:  # warm-up
        work.run(v)
    for r in range(repeats):
        order = group if r % 2 == 0 else tuple(reversed(group))
        for v in order:
            t0 = time.perf_counter()
            work.run(v)
            times[v].append(time.perf_counter() - t0)
        log(f"  {work.shape.name} round {r + 1}/{repeats}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in group))
    return times


def memory_child(shape: Shape, variant: str, compare_rev: str | None) -> None:
    """Fresh process: build, note RSS, reset the high-water mark (/proc/self/clear_refs), run once, report."""
    work = Workloads(shape, None, compare_rev)
    work._checkpointing("hf" if variant == "train_plain_ckpt" else "latent" if variant.endswith("_ckpt") else None)
    baseline = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    work.run(variant)
    peak = _status_mb("VmHWM")
    print(json.dumps({"variant": variant, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
                      "peak_over_baseline_mb": peak - baseline}))


def memory_in_subprocess(shape: Shape, variant: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(asdict(shape)),
           "--variant", variant, "--threads", str(args.threads)]
    if args.compare_rev:
        cmd += ["--compare-rev", args.compare_rev]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess {shape.name} / {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile(work: Workloads, variant: str, rows: int) -> str:
    """torch.profiler (CPU) over one run of `variant` after a warm-up; the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    work.run(variant)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        work.run(variant)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(times: dict[str, list[float]], group: tuple[str, ...]) -> list[dict]:
    base = group[0]
    rows = []
    for v in group:
        ratios = [a / b for a, b in zip(times[v], times[base])]
        rows.append({"variant": v, "median_s": median(times[v]), "ratio_of_medians": median(times[v]) / median(times[base]),
                     "median_paired_ratio": median(ratios)})
    return rows


def format_tables(timing: dict, memory: dict) -> str:
    lines = ["| shape | variant | median s | x plain (medians) | x plain (paired) |", "|---|---|---:|---:|---:|"]
    for shape_name, rows in timing.items():
        for r in rows:
            lines.append(f"| {shape_name} | {r['variant']} | {r['median_s']:.3f} | {r['ratio_of_medians']:.2f}x "
                         f"| {r['median_paired_ratio']:.2f}x |")
    if memory:
        lines += ["", "| shape | variant | peak RSS over setup, MB | x plain |", "|---|---|---:|---:|"]
        for shape_name, by_variant in memory.items():
            for v, m in by_variant.items():
                plain = by_variant.get("train_plain_ckpt" if v.endswith("_ckpt") else "train_plain")
                ratio = m["peak_over_baseline_mb"] / plain["peak_over_baseline_mb"] if plain else float("nan")
                lines.append(f"| {shape_name} | {v} | {m['peak_over_baseline_mb']:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, well under a minute")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per pair (after one warm-up)")
    p.add_argument("--compare-rev", default=None, help="also time the Coconut wrapper of this git revision")
    p.add_argument("--only", choices=["timing", "memory"], default=None)
    p.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                   help="variant groups to run (memory: the train groups)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="PREFIX",
                   help="only the shapes whose name starts with a PREFIX (e.g. gpt2-small 4x256 llama)")
    p.add_argument("--profile", nargs="+", default=None, metavar="VARIANT",
                   help="instead of timing: profile one run of each VARIANT (e.g. train_plain train_coconut) on the "
                        "first timing shape and print the top ops")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("bench_overhead_quick.json") if args.quick else DEFAULT_OUT
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(Shape(**json.loads(args.memory_child)), args.variant, args.compare_rev)
    if args.profile:
        work = Workloads((QUICK_TIME if args.quick else TIME_SHAPES)[0], None, args.compare_rev)
        for variant in args.profile:
            print(f"## {variant} ({work.shape.name})\n{profile(work, variant, rows=25)}")
        return None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    time_shapes, memory_shapes, gen = (QUICK_TIME, QUICK_MEMORY, QUICK_GEN) if args.quick else (TIME_SHAPES, MEMORY_SHAPES, GEN)
    if args.shapes:  # keep the shapes whose name starts with one of the given prefixes
        time_shapes, memory_shapes = ([s for s in shapes if any(s.name.startswith(p) for p in args.shapes)]
                                      for shapes in (time_shapes, memory_shapes))
    load_before = load_average()
    memory = {}
    if args.only != "timing":
        variants = [v for g in pairs([n for n in args.groups if n != "gen"], False, args.compare_rev is not None)
                    for v in g]
        for shape in memory_shapes:
            memory[shape.name] = {}
            for v in variants:
                memory[shape.name][v] = memory_in_subprocess(shape, v, args)
                log(f"memory {shape.name} {v}: {memory[shape.name][v]['peak_over_baseline_mb']:.0f} MB over setup")
    timing, raw = {}, {}
    if args.only != "memory":
        for i, shape in enumerate(time_shapes):
            work = Workloads(shape, gen if i == 0 else None, args.compare_rev)
            raw[shape.name], timing[shape.name] = {}, []
            for group in pairs(args.groups, work.gen is not None, args.compare_rev is not None):
                times = interleaved(work, group, args.repeats, log)
                raw[shape.name].update(times)
                timing[shape.name] += summarise(times, group)
    table = format_tables(timing, memory)
    print(table)
    result = {
        "benchmark": "bench_overhead",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "config": {"quick": args.quick, "repeats": args.repeats, "groups": args.groups, "compare_rev": args.compare_rev, "threads": args.threads,
                   "time_shapes": [asdict(s) for s in time_shapes], "memory_shapes": [asdict(s) for s in memory_shapes],
                   "generation": gen},
        "environment": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "method": "1 warm-up per variant, then rounds alternating the order within each group (A/B, B/A); medians "
                  "and the median of per-round ratios to the group's first (plain HF) variant. Memory: VmHWM of a "
                  "fresh subprocess reset after building model and data, minus the RSS right after setup.",
        "timings_s": raw, "timing": timing, "memory": memory, "table_markdown": table,
    }
    write_json_atomic(args.out, result)
    log(f"wrote {args.out}; load average before {load_before}, after {result['load_average_1_5_15']['after']}")


if __name__ == "__main__":
    main()

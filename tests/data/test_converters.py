"""Converters reproduce the released files' records; the synthetic generator is seeded and well-formed."""

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from coconut_scale.data import prosqa_synthetic
from coconut_scale.data.converters import gsm_hf, gsm_icot, prontoqa, prosqa
from coconut_scale.data.records import DataFormatError, load_records, validate_records
from shared_data import shared_data

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- GSM8K, iCoT text format


def test_gsm_icot_released_file():
    path = shared_data("gsm8k_icot_valid.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = gsm_icot.convert_file(path)
    assert len(records) == len(lines) == 500
    assert records[0] == {
        "question": "John cuts his grass to 2 inches.  It grows .5 inches per month.  When it gets to 4 inches he "
                    "cuts it back down to 2 inches.  It cost $100 to get his grass cut.  How much does he pay per year?",
        "steps": ["<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>"],
        "answer": "300",
    }
    # Every record rebuilds its line exactly, so nothing is lost or altered (commas in answers kept: "30,000").
    for line, rec in zip(lines, records):
        assert f"{rec['question']}||{' '.join(rec['steps'])} #### {rec['answer']}" == line
    # The official preprocessing gives [""] to the problems without annotations (six in this split).
    empty = [r for r in records if r["steps"] == [""]]
    assert len(empty) == 6 and empty[0]["answer"] == "9"
    dropped = gsm_icot.convert_file(path, drop_empty_steps=True)
    assert [i for i, r in enumerate(dropped) if r["steps"] == []] == [i for i, r in enumerate(records) if r in empty]
    validate_records(records, str(path))


def test_gsm_icot_malformed_line():
    with pytest.raises(DataFormatError, match=r"x.txt: record 1: line 3: no '\|\|'"):
        gsm_icot.convert(["q||<<1+1=2>> #### 2", "", "no separator #### 3"], source="x.txt")
    with pytest.raises(DataFormatError, match="no '####'"):
        gsm_icot.convert(["q||<<1+1=2>> 2"], source="x.txt")


def test_gsm_icot_cli(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("Add 1 and 2.||<<1+2=3>> #### 3\nDouble 4.||<<4*2=8>> <<8=8>> #### 8\n")
    gsm_icot.main([str(src), str(tmp_path / "out.json")])
    assert load_records(tmp_path / "out.json") == [
        {"question": "Add 1 and 2.", "steps": ["<<1+2=3>>"], "answer": "3"},
        {"question": "Double 4.", "steps": ["<<4*2=8>>", "<<8=8>>"], "answer": "8"},
    ]


# ---------------------------------------------------------------- GSM8K, Hugging Face format

HF_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A big number?", "answer": "It is 1000*30 = <<1000*30=30000>>30,000.\n#### 30,000"},
    {"question": "No calculation?", "answer": "Just 5.\n#### 5"},
]


def test_gsm_hf_convert():
    assert gsm_hf.convert(HF_ROWS) == [
        {"question": HF_ROWS[0]["question"], "steps": ["<<48/2=24>>", "<<48+24=72>>"], "answer": "72"},
        {"question": "A big number?", "steps": ["<<1000*30=30000>>"], "answer": "30,000"},
        {"question": "No calculation?", "steps": [], "answer": "5"},
    ]


def test_gsm_hf_local_jsonl_cli_and_errors(tmp_path):
    src = tmp_path / "gsm.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in HF_ROWS))
    gsm_hf.main(["--input", str(src), str(tmp_path / "out.json")])
    assert load_records(tmp_path / "out.json") == gsm_hf.convert(HF_ROWS)
    with pytest.raises(DataFormatError, match=r"s: record 1: field 'answer': solution has no '#### answer' line"):
        gsm_hf.convert([HF_ROWS[0], {"question": "q", "answer": "no final line"}], source="s")
    with pytest.raises(DataFormatError, match=r"record 0: field 'question': missing or not a string"):
        gsm_hf.convert([{"answer": "#### 1"}], source="s")


# ---------------------------------------------------------------- ProsQA as released


def test_prosqa_released_file():
    path = shared_data("prosqa_valid.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = prosqa.convert_file(path)
    assert records == raw  # identical, graph keys included
    slim = prosqa.convert_file(path, keep_graph=False)
    assert slim[0] == {k: raw[0][k] for k in ("question", "steps", "answer")}
    # The proof steps are ProsQA's path through its graph, which the generator below mimics.
    rec = raw[0]
    sym = rec["idx_to_symbol"]
    assert rec["steps"][0] == f"{sym[rec['root']]} is a {rec['steps'][0].split()[-1][:-1]}."
    assert rec["answer"] == f"{sym[rec['root']]} is a {sym[rec['target']]}."


def test_prosqa_cli_rejects_bad_record(tmp_path):
    src = tmp_path / "p.json"
    src.write_text(json.dumps([{"question": "q", "steps": [1], "answer": "a"}]))
    with pytest.raises(DataFormatError, match=r"p.json: record 0: field 'steps\[0\]'"):
        prosqa.main([str(src), str(tmp_path / "o.json")])


# ---------------------------------------------------------------- ProntoQA generator output

PRONTO_RAW = {
    "example1": {
        "in_context_examples": [],
        "test_example": {
            "question": "Every wumpus is a yumpus. Yumpuses are bitter. Max is a wumpus.",
            "query": "True or false: Max is bitter.",
            "chain_of_thought": ["Max is a wumpus.", "Every wumpus is a yumpus.", "Max is a yumpus.",
                                 "Yumpuses are bitter.", "Max is bitter."],
            "answer": "True",
        },
    },
    "example2": {
        "test_example": {
            "question": "Every rompus is not sour. Sam is a rompus.",
            "query": "True or false: Sam is sour.",
            "chain_of_thought": ["Sam is a rompus.", "Every rompus is not sour.", "Sam is not sour."],
            "answer": False,  # JSON boolean tolerated
        },
    },
}


def test_prontoqa_official_semantics():
    records = prontoqa.convert(PRONTO_RAW)
    assert records[0] == {
        "question": "Every wumpus is a yumpus. Yumpuses are bitter. Max is a wumpus. True or false: Max is bitter.",
        "steps": ["Max is a wumpus. Every wumpus is a yumpus.", "Max is a yumpus. Yumpuses are bitter.",
                  "Max is bitter."],
        "answer": "True",
    }
    assert records[1]["steps"] == ["Sam is a rompus. Every rompus is not sour.", "Sam is not sour."]
    assert records[1]["answer"] == "False"
    assert prontoqa.convert(PRONTO_RAW, sentences_per_step=1)[1]["steps"] == PRONTO_RAW["example2"]["test_example"][
        "chain_of_thought"]


def test_prontoqa_errors_and_splits(tmp_path):
    bad = {"example1": {"test_example": {"question": "q", "query": "r", "answer": "True"}}}
    with pytest.raises(DataFormatError, match=r"src: record 0: field 'example1.test_example.chain_of_thought'"):
        prontoqa.convert(bad, source="src")
    with pytest.raises(DataFormatError, match="test_example"):
        prontoqa.convert({"example1": {}}, source="src")
    many = {f"example{i}": PRONTO_RAW["example1"] for i in range(9205)}
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(many))
    prontoqa.main([str(src), str(tmp_path / "pq"), "--official-splits"])
    sizes = {s: len(load_records(tmp_path / f"pq_{s}.json")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 9000, "valid": 200, "test": 5}


# ---------------------------------------------------------------- synthetic ProsQA


def _reach(edges, start):
    adj = defaultdict(list)
    for u, v in edges:
        adj[u].append(v)
    seen, todo = {start}, [start]
    while todo:
        for v in adj[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def test_synthetic_is_seeded_valid_and_sound():
    a = prosqa_synthetic.generate(300, seed=3, n_concepts=9, min_depth=2, max_depth=4)
    assert a == prosqa_synthetic.generate(300, seed=3, n_concepts=9, min_depth=2, max_depth=4)
    assert a != prosqa_synthetic.generate(300, seed=4, n_concepts=9, min_depth=2, max_depth=4)
    validate_records(a, "synthetic")
    assert len({r["question"] for r in a}) == 300
    depths = set()
    first_is_target = 0
    for r in a:
        sym, edges = r["idx_to_symbol"], r["edges"]
        person, target, neg = sym[r["root"]], sym[r["target"]], sym[r["neg_target"]]
        from_root = _reach(edges, r["root"])
        assert r["target"] in from_root and r["neg_target"] not in from_root
        # the wrong option is provable for someone else, and both options are sinks
        assert any(r["neg_target"] in _reach(edges, p) for p in range(len(sym)) if p != r["root"])
        assert not any(u in (r["target"], r["neg_target"]) for u, _ in edges)
        # no surface shortcut: the options have as many parents, and no person is a parent of either
        parents = {o: [u for u, v in edges if v == o] for o in (r["target"], r["neg_target"])}
        assert len(parents[r["target"]]) == len(parents[r["neg_target"]])
        assert all(sym[u][0].islower() for ps in parents.values() for u in ps)
        assert r["question"].endswith(f"Is {person} a {target} or {neg}?") or r["question"].endswith(
            f"Is {person} a {neg} or {target}?")
        first_is_target += r["question"].endswith(f"a {target} or {neg}?")
        assert r["answer"] == f"{person} is a {target}."
        # steps: a chain of stated facts from the person to the target, ProsQA wording
        facts = set(r["question"].rsplit(" Is ", 1)[0].split(". "))
        assert r["steps"][0].startswith(f"{person} is a ") and r["steps"][-1].endswith(f" is a {target}.")
        for s, nxt in zip(r["steps"], r["steps"][1:]):
            assert nxt.startswith(f"Every {s.split()[-1][:-1]} is a ")
        assert all(s.rstrip(".") in {f.rstrip(".") for f in facts} for s in r["steps"])
        depths.add(len(r["steps"]))
    assert depths == {2, 3, 4}
    assert 0.35 < first_is_target / len(a) < 0.65  # option order carries no signal


def test_synthetic_splits_disjoint_and_cli(tmp_path):
    splits = prosqa_synthetic.generate_splits({"train": 200, "valid": 50}, seed=1)
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["valid"]}
    prefix = tmp_path / "synth"
    prosqa_synthetic.main([str(prefix), "--n-train", "20", "--n-valid", "5", "--n-test", "0", "--seed", "2"])
    assert len(load_records(f"{prefix}_train.json")) == 20 and len(load_records(f"{prefix}_valid.json")) == 5
    assert not Path(f"{prefix}_test.json").exists()
    with pytest.raises(ValueError, match="too small"):
        prosqa_synthetic.generate_one(random.Random(0), n_concepts=3, min_depth=2, max_depth=2)


@pytest.mark.parametrize("script", ["convert_gsm_icot", "convert_gsm_hf", "convert_prosqa", "convert_prontoqa",
                                    "generate_prosqa_synthetic"])
def test_data_scripts_help(script):
    out = subprocess.run([sys.executable, str(REPO / "data" / f"{script}.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage:")


def test_prosqa_synthetic_n_names_draws_every_split_from_one_small_vocabulary():
    pool = prosqa_synthetic.concept_pool(12)
    assert len(set(pool)) == 12 and pool == prosqa_synthetic.concept_pool(12)
    splits = prosqa_synthetic.generate_splits({"train": 60, "val": 20}, seed=1, n_concepts=5, min_depth=1,
                                              max_depth=2, n_names=12)
    people = set(prosqa_synthetic.PEOPLE)
    used = {s for recs in splits.values() for r in recs for s in r["idx_to_symbol"] if s not in people}
    assert used <= set(pool) and len(used) > 6
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["val"]}
    with pytest.raises(ValueError, match="n_concepts=5 exceeds the 4 concept words"):
        prosqa_synthetic.generate(3, n_concepts=5, n_names=4)

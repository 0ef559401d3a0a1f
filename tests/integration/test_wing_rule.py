"""The wing rule of docs/architecture.md, enforced: a wing imports only the wings above it in the document's tree.

The order is read from the document itself (its tree of `coconut_scale/`), so the rule and its description cannot
drift apart. Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "coconut_scale"
DOC = PACKAGE.parent / "docs" / "architecture.md"
BASE = {"errors", "atomic_files", "distributed", "file_manifest"}  # import no wing
TEST_SUPPORT = {"testing": {"model", "data"}}  # tiny models and tokenizers for tests and benchmarks
# `python -m coconut_scale.X` and `deepspeed --module coconut_scale.train` entry points: they only call the CLI.
SHIMS = {"coconut_scale.__main__", "coconut_scale.check", "coconut_scale.eval", "coconut_scale.universal",
         "coconut_scale.train.__main__"}


def documented_order() -> list[str]:
    tree = DOC.read_text().split("```")[1]
    return re.findall(r"^  (\w+)/ ", tree, flags=re.MULTILINE)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == "coconut_scale" or name.startswith("coconut_scale.")]


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_violations(module: str, source: str, order: list[str]) -> list[str]:
    """Each import of `module` (its source text) that the documented order forbids."""
    if module in SHIMS:
        return []
    rank = {wing: i for i, wing in enumerate(order)}
    here = wing_of(module)
    found = []
    for target, line in imports_of(source):
        there = wing_of(target)
        if there is None or there == here:
            continue
        if here in BASE:
            allowed = there in BASE
        elif here in TEST_SUPPORT:
            allowed = there in BASE or there in TEST_SUPPORT[here]
        elif here in rank:
            allowed = there in BASE or (there in rank and rank[there] < rank[here])
        else:
            allowed = False
        if not allowed:
            found.append(f"{module}:{line} ({here}) imports {target} ({there})")
    return found


def test_the_document_lists_every_wing_once():
    order = documented_order()
    wings = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert sorted(order) == wings and len(set(order)) == len(order), (order, wings)


def test_no_wing_imports_one_below_it():
    order = documented_order()
    found = [v for path in sorted(PACKAGE.rglob("*.py"))
             for v in module_violations(module_name(path), path.read_text(), order)]
    assert found == []


def test_the_rule_sees_a_violation():
    """A lazy import against the order (the model wing importing the trainer) and one from a base module."""
    order = documented_order()
    lazy = "def f():\n    from coconut_scale.train.trainer import Trainer\n"
    assert module_violations("coconut_scale.model.probe", lazy, order) == [
        "coconut_scale.model.probe:2 (model) imports coconut_scale.train.trainer (train)"]
    assert module_violations("coconut_scale.errors", "import coconut_scale.model.coconut\n", order)
    assert module_violations("coconut_scale.train.probe", "from coconut_scale.model import Coconut\n", order) == []

"""The house rules: imports follow the data flow, no import circle, one vocabulary.

Every ``import`` statement of the package is read from its source (module level, inside functions
and under ``TYPE_CHECKING`` alike), so a type-only or lazy import against the flow fails too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vocab

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vocab", "model", "orchestrator", "benchmarks")

# The stages in data-flow order: a module may import its own stage and earlier ones only.
# ``hashing`` and ``vocab`` are leaves everyone may use; ``tracking`` is the MLflow schema that
# trials and sweeps write through and the report reads; ``pipeline`` and ``cli`` sit on top.
FLOW: tuple[tuple[str, ...], ...] = (
    ("vocab", "orchestrator.hashing"),
    ("model",),
    ("orchestrator.data",),
    ("orchestrator.features",),
    ("orchestrator.tracking",),
    ("orchestrator.trial",),
    ("orchestrator.sweep",),
    ("orchestrator.report",),
    ("orchestrator.predict",),
    ("orchestrator.pipeline",),
    ("orchestrator.cli", "benchmarks"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    files = [ROOT / "vocab.py"]
    for package in PACKAGES[1:]:
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(f): f for f in files}


def imported_modules(path: Path, known: set[str]) -> Iterator[str]:
    """Our modules that ``path`` imports, at any depth of its code."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


def stage_of(module: str) -> int:
    if module == "orchestrator":  # the namespace's docstring, which imports nothing
        return 0
    for rank, prefixes in enumerate(FLOW):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no stage of FLOW: add it there")


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: set(imported_modules(path, known)) - {name} for name, path in modules.items()}


def test_every_import_follows_the_data_flow() -> None:
    against = [f"{a} (stage {stage_of(a)}) imports {b} (stage {stage_of(b)})"
               for a, targets in import_graph().items() for b in sorted(targets)
               if stage_of(b) > stage_of(a)]
    assert not against, "imports against the flow:\n" + "\n".join(against)


def test_there_is_no_import_circle() -> None:
    graph = import_graph()
    # A package's __init__ importing its own submodules is not a circle of jobs: leave it out.
    edges = {a: {b for b in targets if not (a and b.startswith(a + "."))} for a, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_model_and_vocab_import_no_ray_mlflow_or_decord() -> None:
    code = ("import sys, vocab, model; heavy = sorted(m for m in ('ray', 'mlflow', 'decord', 'optuna') "
            "if m in sys.modules); print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
    out = subprocess.run([sys.executable, "-c", "import sys, vocab; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", "vocab must not import torch"


def string_constants(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


# Words that are a vocabulary name by coincidence: the ``mtcae demo`` command is not the dataset,
# and a search-space file's ``search:`` section is not the stage.
COINCIDENCES = {("orchestrator/cli.py", "demo"), ("orchestrator/sweep/space_file.py", "search")}


@pytest.mark.parametrize("kind, names", [
    ("architecture", vocab.ARCHITECTURES), ("dataset", vocab.DATASETS),
    ("stage", (vocab.STAGE_SEARCH, vocab.STAGE_CV)),
])
def test_each_name_is_spelled_only_in_the_vocabulary(kind: str, names: tuple[str, ...]) -> None:
    spelled = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
               for name, path in package_modules().items() if name != "vocab"
               for line, value in string_constants(path)
               if value in names and (str(path.relative_to(ROOT)), value) not in COINCIDENCES]
    assert not spelled, f"{kind} names spelled outside vocab.py (import them from vocab):\n" + "\n".join(spelled)

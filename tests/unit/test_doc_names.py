"""The names README.md and ARCHITECTURE.md cite exist: a file path, a module, a dotted name
(``shared.queue.jobs.Jobs``, ``worker.runtime.Runtime``) or a class member (``Store.jobs``,
``Readings.position``) that no longer exists fails here, so the docs cannot drift from the
code unnoticed."""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "ARCHITECTURE.md")
CODE_ROOTS = ("llmq", "bench", "local", "tests")
# Top folders a cited path may start with; ``gateway/``, ``worker/``, ``shared/`` and
# ``cli/`` are read as under ``llmq/`` (the docs' short form).
PATH_ROOTS = (*CODE_ROOTS, "scripts", "monitoring", "compose", "deploy", ".ci")
SHORT_ROOTS = ("gateway", "worker", "shared", "cli")
# Classes of libraries the docs name with a member (never defined here).
FOREIGN_CLASSES = {"Server", "HttpToolsProtocol", "AppStatus", "EventSourceResponse"}
# Cited names that are not code: logger names, Helm values, a file the operator makes.
NOT_CODE = {"llmq.access", "llmq.jobs", "gateway.preStopSleepSeconds", "llmq.appEnv",
            "compose/.env"}  # fmt: skip

_TICKED = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^[\w.-]+(/[\w.-]+)*/?(::\w+)?$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _ticked(doc: str) -> list[str]:
    return _TICKED.findall((ROOT / doc).read_text())


def _cited_paths(doc: str) -> list[str]:
    out = []
    for token in _ticked(doc):
        if "/" not in token or not _PATH.match(token):
            continue
        top = token.split("/", 1)[0]
        if (top in PATH_ROOTS or top in SHORT_ROOTS) and token not in NOT_CODE:
            out.append(token)
    return out


def _path_problem(token: str) -> str | None:
    path, _, test = token.partition("::")
    where = ROOT / path
    if path.split("/", 1)[0] in SHORT_ROOTS:
        where = ROOT / "llmq" / path
    if not where.exists():
        # ``worker/batch.run_line``: a module's member, cited by its file.
        module, dot, member = path.partition(".")
        if dot and not member.endswith(("py", "md", "yaml", "yml", "sh", "json", "toml")):
            return _resolve_dotted(module.replace("/", ".") + "." + member)
        return f"{token}: no such file or folder"
    if test and f"def {test}(" not in where.read_text():
        return f"{token}: no test {test} in {path}"
    return None


@cache
def _classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Every top-level class of the code, by name: (module, its AST)."""
    found: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for root in CODE_ROOTS:
        for file in (ROOT / root).rglob("*.py"):
            module = ".".join(file.relative_to(ROOT).with_suffix("").parts)
            for node in ast.parse(file.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append((module, node))
    return found


def _has_member(module: str, name: str, member: str) -> bool:
    cls = getattr(importlib.import_module(module), name)
    if hasattr(cls, member):
        return True
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", {})
    if member in fields:
        return True
    # Attributes set in __init__ (``self.jobs = ...``).
    node = next(n for m, n in _classes()[name] if m == module)
    return any(
        isinstance(t, ast.Attribute) and t.attr == member
        for n in ast.walk(node)
        if isinstance(n, ast.Assign | ast.AnnAssign)
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
    )


def _resolve_dotted(token: str) -> str | None:
    """None when ``token`` names something that exists (or is not ours to check)."""
    parts = token.split(".")
    if parts[0] in SHORT_ROOTS:
        parts = ["llmq", *parts]
    if parts[0] in CODE_ROOTS:
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    return f"{token}: {'.'.join(parts[:cut])} has no {attr}"
                obj = getattr(obj, attr)
            return None
        return f"{token}: no such module"
    name, member = parts[0], parts[1]
    if not name[:1].isupper() or len(parts) != 2 or name in FOREIGN_CLASSES:
        return None  # a file name (``compose.yaml``), a library's name, or not a class
    if name not in _classes():
        return f"{token}: no class {name} in the code"
    if not any(_has_member(module, name, member) for module, _ in _classes()[name]):
        return f"{token}: {name} has no member {member}"
    return None


@cache
def _written_names() -> frozenset[str]:
    """Dotted names the code writes as strings (span attributes such as
    ``llmq.queue.position``, logger names): cited as what the service emits, not as code."""
    found: set[str] = set()
    for path in (ROOT / "llmq").rglob("*.py"):
        found.update(re.findall(r'"(llmq(?:\.[a-z_]+)+)"', path.read_text()))
    return frozenset(found)


def _cited_dotted(doc: str) -> list[str]:
    out = []
    for token in _ticked(doc):
        token = token.removesuffix("()")
        if token in NOT_CODE or re.search(r"\.(py|md|yaml|yml|json|sh|toml)$", token):
            continue
        if token in _written_names():
            continue
        if _DOTTED.match(token):
            out.append(token)
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_path_exists(doc: str) -> None:
    problems = [p for t in _cited_paths(doc) if (p := _path_problem(t))]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_dotted_name_exists(doc: str) -> None:
    problems = [p for t in _cited_dotted(doc) if (p := _resolve_dotted(t))]
    assert problems == [], "\n".join(problems)


def test_the_check_catches_a_stale_name() -> None:
    """The checker itself: names that were true once and are not now are caught."""
    assert _resolve_dotted("worker.job.RUNTIME") is not None  # it is worker/runtime.py's
    assert _resolve_dotted("Store.reap") is not None  # it is Store.workers.reap
    assert _resolve_dotted("Readings.position") is None
    assert _path_problem("llmq/shared/store.py") is not None
    assert _path_problem("tests/unit/test_doc_names.py::test_every_cited_path_exists") is None

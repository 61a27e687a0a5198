"""Scripts bind their KEYS and ARGV to names, and are called by name."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from typing import Any

import pytest

from llmq.shared import queue
from llmq.shared.queue.lua import Registered, Script
from llmq.shared.queue.records import SET_METADATA

ECHO = Script(
    keys=("first", "second"),
    args=("a", "b"),
    rest="more",
    consts={"CODE": 7, "WORD": 'say "hi"'},
    clock=True,
    body="return {first, second, a, b, #more, CODE, WORD, now > 0 and 1 or 0}",
)


def test_the_source_binds_every_name_in_its_first_lines() -> None:
    head = ECHO.source.splitlines()
    assert head[:4] == [
        "local first = KEYS[1]",
        "local second = KEYS[2]",
        "local a = ARGV[1]",
        "local b = ARGV[2]",
    ]
    assert head[4] == "local more = {unpack(ARGV, 3)}"
    assert head[5:7] == ["local CODE = 7", 'local WORD = "say \\"hi\\""']


def test_arguments_are_passed_by_name_and_checked() -> None:
    keys, argv = ECHO.bind({"second": "k2", "first": "k1"}, {"b": 2, "a": 1}, rest=[9, 9])
    assert (keys, argv) == (["k1", "k2"], [1, 2, 9, 9])
    with pytest.raises(TypeError, match="missing \\['second'\\]"):
        ECHO.bind({"first": "k1"}, {"a": 1, "b": 2})
    with pytest.raises(TypeError, match="unknown \\['c'\\]"):
        ECHO.bind({"first": "k1", "second": "k2"}, {"a": 1, "b": 2, "c": 3})
    with pytest.raises(TypeError, match="no trailing"):
        SET_METADATA.bind({"stored": "k"}, {"metadata": "{}"}, rest=[1])


async def test_a_script_runs_with_its_names(contract_redis: Any) -> None:
    out = await Registered(contract_redis, ECHO)(
        keys={"first": "k1", "second": "k2"}, args={"a": "x", "b": "y"}, rest=["1", "2", "3"]
    )
    assert out == [b"k1", b"k2", b"x", b"y", 3, 7, b'say "hi"', 1]


MODULES = [
    importlib.import_module(f"llmq.shared.queue.{m.name}")
    for m in pkgutil.iter_modules(queue.__path__)
]
SCRIPTS = {
    f"{module.__name__}.{name}": value
    for module in MODULES
    for name, value in vars(module).items()
    if isinstance(value, Script)
}


def test_the_package_holds_every_script() -> None:
    assert len(SCRIPTS) == 20, sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_uses_only_its_names(name: str) -> None:
    """No KEYS[n] or ARGV[n] in a body: positions appear only in the generated header."""
    script = SCRIPTS[name]
    assert "KEYS[" not in script.body
    assert "ARGV[" not in script.body


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_each_module_runs_only_the_scripts_it_defines(module: Any) -> None:
    """``Registered(redis, NAME)``: NAME is a Script of the same module (a module owns the
    scripts it calls), never one imported from elsewhere."""
    tree = ast.parse(inspect.getsource(module))
    registered = [
        node.args[1].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Registered"
        and isinstance(node.args[1], ast.Name)
    ]
    own = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert set(registered) <= own, set(registered) - own

"""The wheel: one import root (`llmq`), two console scripts, runnable outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.stack import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("llmq-*.whl")
    return built


def test_wheel_ships_only_the_llmq_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"llmq", wheel.name.split("-py")[0] + ".dist-info"}
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    assert packages == {
        "llmq",
        "llmq/shared",
        "llmq/shared/queue",
        "llmq/shared/responses",
        "llmq/cli",
        "llmq/gateway",
        "llmq/worker",
    }
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "llmq-gateway = llmq.gateway.__main__:main" in text
    assert "llmq-worker = llmq.worker.__main__:main" in text
    assert "llmq-keys = llmq.cli.llmq_keys:main" in text
    assert "llmq-jobs = llmq.cli.llmq_jobs:main" in text


@pytest.mark.parametrize("module", ["llmq.gateway", "llmq.worker"])
def test_installed_wheel_runs_from_another_directory(
    wheel: Path, tmp_path: Path, module: str
) -> None:
    """Installed (not editable) into a folder of its own and started elsewhere, each entry
    point gets as far as reading its settings: no path into a checkout is needed."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-t", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}]; import llmq; "
        f"assert llmq.__file__.startswith({str(target)!r}), llmq.__file__; "
        f"import runpy; runpy.run_module({module!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "MAX_ACTIVE": "0"},
    )
    assert proc.returncode != 0
    assert "invalid configuration" in proc.stderr, proc.stderr
    assert "MAX_ACTIVE" in proc.stderr

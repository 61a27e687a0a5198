"""Static checks of the monitoring files: promtool, dashboard structure, generator output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from local.prometheus_config import SOURCE, localize
from tests.support.stack import ROOT

DASHBOARD = ROOT / "monitoring/grafana/dashboards/llmq-operator.json"
RULES = sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml"))
DS = {"type": "prometheus", "uid": "${datasource}"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool missing: scripts/test.sh installs Debian's prometheus package")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_config_and_rules(tmp_path: Path) -> None:
    res = promtool("check", "config", str(SOURCE))
    assert res.returncode == 0, res.stdout + res.stderr
    local = tmp_path / "local.yml"
    local.write_text(
        localize(SOURCE.read_text(), {"gateway": "127.0.0.1:1"}, "1s", SOURCE.parent / "rules")
    )
    res = promtool("check", "config", str(local))
    assert res.returncode == 0, res.stdout + res.stderr
    assert RULES
    res = promtool("check", "rules", *map(str, RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_scrapes_every_service_by_compose_name() -> None:
    text = SOURCE.read_text()
    for target in ("gateway:9101", "dcgm-exporter:9400"):
        assert f'"{target}"' in text
    config = yaml.safe_load(text)
    found = {j["job_name"]: j["dns_sd_configs"][0] for j in config["scrape_configs"]
             if "dns_sd_configs" in j}  # fmt: skip
    workers, engines = ["worker", "worker-2", "worker-embed"], ["vllm", "vllm-2", "vllm-embed"]
    assert (found["worker"]["names"], found["worker"]["port"]) == (workers, 9100)
    assert (found["vllm"]["names"], found["vllm"]["port"]) == (engines, 8000)


def test_every_alert_has_summary_and_runbook_description() -> None:
    for rules_file in RULES:
        text = rules_file.read_text()
        assert text.count("- alert:") == text.count("summary:") == text.count("description:")


def test_committed_dashboard_is_the_generators_output() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "monitoring/build_dashboard.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == json.loads(DASHBOARD.read_text()), (
        "regenerate: python monitoring/build_dashboard.py > " + str(DASHBOARD.relative_to(ROOT))
    )


def test_dashboard_ids_datasources_and_grid() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
            assert t["expr"].strip()

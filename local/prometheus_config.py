"""Derive a loopback Prometheus config from the compose one (monitoring/prometheus/).

    python -m local.prometheus_config --out var/prometheus/prometheus.yml \
        --target gateway=127.0.0.1:8080 --target worker=127.0.0.1:9100 ...

The compose config names its targets by service (``"gateway:8080"``); this rewrites each
job's target to the given address, drops jobs with no address given (no DCGM exporter on a
laptop), sets the scrape interval and makes the rules path absolute. Plain text rewriting:
the source keeps one ``targets:`` line per job, which its header comment asks for.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "monitoring" / "prometheus" / "prometheus.yml"

_JOB = re.compile(r"^  - job_name: (\S+)\n(?:(?!  - job_name:).*\n)*", re.M)


def localize(text: str, targets: dict[str, str], interval: str, rules_dir: Path) -> str:
    def job(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in targets:
            return ""
        return re.sub(r'targets: \["[^"]+"\]', f'targets: ["{targets[name]}"]', match.group(0))

    text = _JOB.sub(job, text)
    text = re.sub(r"(scrape_interval|evaluation_interval): \S+", rf"\1: {interval}", text)
    return text.replace("  - rules/*.yml", f"  - {rules_dir}/*.yml")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", action="append", default=[], metavar="JOB=HOST:PORT")
    ap.add_argument("--interval", default="5s")
    args = ap.parse_args(argv)
    targets = dict(t.split("=", 1) for t in args.target)
    text = localize(SOURCE.read_text(), targets, args.interval, SOURCE.parent / "rules")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

"""The loopback Prometheus config derived from the compose one."""

from __future__ import annotations

from pathlib import Path

import yaml

from local.prometheus_config import SOURCE, localize


def test_jobs_point_at_the_given_addresses_and_the_rest_are_dropped(tmp_path: Path) -> None:
    text = localize(
        SOURCE.read_text(),
        {"gateway": "127.0.0.1:18080", "vllm": "127.0.0.1:18000"},
        "2s",
        tmp_path / "rules",
    )
    config = yaml.safe_load(text)
    assert [j["job_name"] for j in config["scrape_configs"]] == ["gateway", "vllm"]
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:18080"]}]
    assert config["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s"}
    assert config["rule_files"] == [str(tmp_path / "rules" / "*.yml")]


def test_a_job_given_twice_scrapes_both_addresses(tmp_path: Path) -> None:
    """The local run's two workers (the chat model's and the embedding model's)."""
    from local.prometheus_config import main

    out = tmp_path / "p.yml"
    main(["--out", str(out), "--target", "worker=127.0.0.1:9100",
          "--target", "worker=127.0.0.1:9102", "--target", "gateway=127.0.0.1:9101"])  # fmt: skip
    jobs = {j["job_name"]: j for j in yaml.safe_load(out.read_text())["scrape_configs"]}
    assert jobs["worker"]["static_configs"] == [{"targets": ["127.0.0.1:9100", "127.0.0.1:9102"]}]
    assert jobs["gateway"]["static_configs"] == [{"targets": ["127.0.0.1:9101"]}]

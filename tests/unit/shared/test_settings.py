from __future__ import annotations

import pytest

from llmq.shared.settings import Settings, load_settings


def test_defaults() -> None:
    s = Settings()
    assert s.gateway_port == 8080
    assert s.queue_mode == "queue"
    assert s.max_body_bytes == 8 * 1024 * 1024


def test_environment_names_are_the_design_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in {
        "MAX_ACTIVE": "3",
        "QUEUE_MODE": "reject",
        "QUEUE_MAX": "7",
        "QUEUE_TIMEOUT_S": "2.5",
        "REQUEST_TIMEOUT_S": "9",
        "VLLM_URL": "http://e:8000",
        "REDIS_URL": "redis://r:6379/1",
    }.items():
        monkeypatch.setenv(var, value)
    s = load_settings()
    assert (s.max_active, s.queue_mode, s.queue_max) == (3, "reject", 7)
    assert (s.queue_timeout_s, s.request_timeout_s) == (2.5, 9)
    assert s.vllm_url == "http://e:8000"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("QUEUE_MODE", "maybe"),
        ("MAX_ACTIVE", "-1"),
        ("GATEWAY_PORT", "http"),
        ("REDIS_URL", "localhost"),
    ],
)
def test_bad_value_exits_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit, match=var):
        load_settings()


def test_a_bad_setting_is_named_and_no_value_is_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sekrit-key")
    monkeypatch.setenv("REDIS_URL", "http://user:sekrit-password@host")
    with pytest.raises(SystemExit) as info:
        load_settings()
    message = str(info.value)
    assert "REDIS_URL: Value error, must start with" in message
    assert "sekrit" not in message


def test_the_engine_key_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sekrit-key")
    settings = Settings()
    assert "sekrit" not in repr(settings)
    assert settings.vllm_api_key is not None
    assert settings.vllm_api_key.get_secret_value() == "sekrit-key"

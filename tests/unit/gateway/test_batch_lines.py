"""A batch input file, checked line by line at upload (no Redis needed)."""

from __future__ import annotations

import json

import pytest

from llmq.gateway.batch_api import validate_lines
from llmq.shared.errors import InvalidRequest
from llmq.shared.settings import Settings

SETTINGS = Settings(batch_max_lines=3)


def item(custom_id: str, **body: object) -> bytes:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": request,
    }
    return json.dumps(line).encode()


def test_good_lines_come_back_blank_lines_skipped_with_their_models() -> None:
    raw = item("a") + b"\n\n" + item("b", max_tokens=5) + b"\n" + item("c", model="other")
    lines, models = validate_lines(raw, SETTINGS)
    assert lines == [item("a"), item("b", max_tokens=5), item("c", model="other")]
    assert models == ["m", "other"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "holds no request"),
        (b"\n".join(item(str(i)) for i in range(4)), "at most 3"),
        (item("a") + b"\n[1]", "line 2: not a JSON object"),
        (item("a") + b"\n" + item(""), "line 2: custom_id"),
        (item("a", n=2), "line 1: n is at most 1"),
        (item("a", unknown_field=1), "line 1: unsupported field 'unknown_field'"),
        (item("a", temperature=9), "line 1: body.temperature"),
        (json.dumps({"custom_id": "a", "method": "GET"}).encode(), 'line 1: method must be "POST"'),
    ],
)
def test_a_bad_line_is_a_400_naming_it(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_lines(raw, SETTINGS)
    assert message in err.value.message
    assert err.value.param == "file"

"""Sealing payloads (PAYLOAD_KEYS): what is sealed opens only with a key held, only where it
was sealed; keys rotate; a malformed key is refused without being repeated."""

from __future__ import annotations

import base64
import hashlib

import pytest

from llmq.shared import protocol as p
from llmq.shared.errors import PayloadUndecryptable
from llmq.shared.prefix import signature
from llmq.shared.sealing import Sealer, is_sealed, key_id, new_key, parse_keys
from llmq.shared.settings import Settings, load_settings

CANARY = b"CANARY-7f3a"


def sealer(*keys: str, **kw: object) -> Sealer:
    return Sealer(parse_keys(",".join(keys)), **kw)  # type: ignore[arg-type]


def test_a_sealed_value_holds_no_plain_text_and_opens_where_it_was_sealed() -> None:
    s = sealer(new_key())
    sealed = s.seal(b'{"content":"' + CANARY + b'"}', "body:j1")
    assert is_sealed(sealed)
    assert CANARY not in sealed
    assert b"\n" not in sealed  # fits in an event line
    assert s.open(sealed, "body:j1") == b'{"content":"' + CANARY + b'"}'
    assert s.seal(b"x", "body:j1") != s.seal(b"x", "body:j1"), "a fresh nonce each time"


def test_a_sealed_value_moved_elsewhere_or_altered_does_not_open() -> None:
    failures: list[int] = []
    s = sealer(new_key(), on_failure=lambda: failures.append(1))
    sealed = s.seal(CANARY, "body:j1")
    with pytest.raises(PayloadUndecryptable, match="belongs elsewhere"):
        s.open(sealed, "body:j2")  # another job's
    with pytest.raises(PayloadUndecryptable):
        s.open(sealed, "messages:j1")  # another field of the same job
    mid = len(sealed) // 2
    flipped = sealed[:mid] + (b"A" if sealed[mid : mid + 1] != b"A" else b"B") + sealed[mid + 1 :]
    with pytest.raises(PayloadUndecryptable):
        s.open(flipped, "body:j1")
    assert len(failures) == 3, "every failure is counted"


def test_keys_rotate_new_first_and_the_old_still_opens_what_it_sealed() -> None:
    old, new = new_key(), new_key()
    before = sealer(old).seal(CANARY, "event:j")
    rotated = sealer(new, old)
    assert rotated.open(before, "event:j") == CANARY
    after = rotated.seal(CANARY, "event:j")
    assert after[2:10] == key_id(parse_keys(new)[0]), "the first key seals"
    assert sealer(new).open(after, "event:j") == CANARY
    with pytest.raises(PayloadUndecryptable, match="holds keys"):
        sealer(new).open(before, "event:j")  # the old key is gone


def test_without_keys_nothing_is_sealed_and_a_sealed_value_does_not_open() -> None:
    plain = Sealer()
    assert not plain.enabled
    assert plain.seal(CANARY, "x") == CANARY
    with pytest.raises(PayloadUndecryptable, match="no PAYLOAD_KEYS"):
        plain.open(sealer(new_key()).seal(CANARY, "x"), "x")


def test_plain_values_open_as_themselves() -> None:
    """Written before keys were set, or by a Lua script (out-of-band errors)."""
    s = sealer(new_key())
    assert s.open(b'{"error":{}}', "event:j") == b'{"error":{}}'
    event = p.Event(0, p.EventType.ERROR, b'{"code":"worker_lost"}')
    assert s.open_event("j", event) == event


def test_a_job_spec_goes_to_redis_with_its_body_sealed_and_its_metadata_plain() -> None:
    s = sealer(new_key())
    spec = p.JobSpec(
        id="chatcmpl-1",
        model="m",
        stream=True,
        include_usage=False,
        enqueued_at_ms=1,
        tenant="team-a",
        body={"messages": [{"role": "user", "content": CANARY.decode()}]},
    )
    stored = s.seal_spec(spec)
    dumped = p.json_dumps(stored.model_dump(mode="json"))
    assert CANARY not in dumped
    assert b'"tenant":"team-a"' in dumped
    assert b'"model":"m"' in dumped
    assert stored.body == {}
    back = s.open_spec(p.JobSpec.model_validate(p.json_loads(dumped)))
    assert back == spec
    other = spec.model_copy(update={"id": "chatcmpl-2", "body": {}, "sealed": stored.sealed})
    with pytest.raises(PayloadUndecryptable):
        s.open_spec(other)  # a body copied into another job


def test_events_are_sealed_per_job_with_number_and_type_plain() -> None:
    s = sealer(new_key())
    data = s.seal_event("j1", b'{"delta":"' + CANARY + b'"}')
    wire = p.Event(5, p.EventType.CHUNK, data).encode()
    assert wire.startswith(b"5 chunk ~1")
    assert CANARY not in wire
    opened = s.open_event("j1", p.Event.decode(wire))
    assert opened == p.Event(5, p.EventType.CHUNK, b'{"delta":"' + CANARY + b'"}')


@pytest.mark.parametrize(
    "value",
    [
        "short",
        base64.urlsafe_b64encode(b"x" * 16).decode(),  # 16 bytes: too short
        "!" * 44,
        "",
    ],
)
def test_a_malformed_key_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    good = new_key()
    monkeypatch.setenv("PAYLOAD_KEYS", f"{good},{value}" if value else " , ")
    with pytest.raises(SystemExit) as exc:
        load_settings()
    message = str(exc.value)
    assert "PAYLOAD_KEYS" in message
    assert good not in message
    assert not value or value not in message
    assert good not in capsys.readouterr().err


def test_the_settings_never_print_the_keys() -> None:
    key = new_key()
    settings = Settings(payload_keys=key)
    assert key not in repr(settings)
    assert key not in str(settings.model_dump())
    assert settings.sealer().key_ids == [key_id(parse_keys(key)[0]).decode()]


def test_none_is_a_deliberate_choice_of_plain_payloads() -> None:
    assert parse_keys("none") == []
    assert not Settings(payload_keys="none").sealer().enabled
    key = new_key()
    with pytest.raises(ValueError, match="listed twice"):
        parse_keys(f"{key},{key}")


def test_prefix_signatures_are_keyed() -> None:
    """Shared prefixes still match under one key; without it a guess cannot be confirmed."""
    body = {"messages": [{"role": "user", "content": "a guessable prompt"}]}
    a, b = sealer(new_key()), sealer(new_key())
    keyed = signature(body, "m", a.prefix_key)
    assert keyed == signature(body, "m", a.prefix_key)
    assert keyed != signature(body, "m")
    assert keyed != signature(body, "m", b.prefix_key)


def test_body_digests_are_keyed_and_each_key_gives_one() -> None:
    """An Idempotency-Key's body check: Redis' copy cannot confirm a guessed body; a retry
    across a rotation (new,old) still matches the digest the old key made."""
    raw = b'{"messages":[{"role":"user","content":"a guessable prompt"}]}'
    old, new = new_key(), new_key()
    before = sealer(old).digests(raw)
    assert len(before) == 1
    assert before[0] != hashlib.sha256(raw).hexdigest()
    rotated = sealer(new, old).digests(raw)
    assert rotated[1] == before[0], "the old key's digest still matches"
    assert rotated[0] != before[0], "new ones are made with the new key"
    assert Sealer().digests(raw) == [hashlib.sha256(raw).hexdigest()]

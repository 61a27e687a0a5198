"""Prompts and answers sealed before they reach Redis: AES-256-GCM under ``PAYLOAD_KEYS``.

Redis, its append-only file, its RDB snapshots, its replicas and its backups hold only
ciphertext of what clients send and get; what operators read there (ids, key names,
models, bands, sizes, times, states, event numbers and types) stays plain. Sealed, each
bound to its place by the cipher's associated data (``where``), so that a sealed value
copied to another job, file or field does not open:

- a job's body (the request for the engine) in arq's payload: ``JobSpec.sealed``,
  ``body:<job id>``;
- the messages a ``store: true`` request keeps: ``messages:<job id>``;
- the data of every event a worker publishes and logs (chunks, the answer, its errors):
  ``event:<job id>``; the event's number and type stay plain;
- each line of a file (a batch's input, output and errors): ``file:<file id>``;
- each result line of a batch: ``result:<batch id>``.

A sealed value is ``~1`` + the key's id (8 hex digits) + base64(nonce | ciphertext | tag):
text, so it fits in JSON and in an event (no newline). The first key seals; every key
opens, found by its id: a key list rotated as ``new,old`` serves what ``old`` sealed until it
is gone from Redis. A value that is not sealed opens as itself: written before keys were
set, or by a Lua script (the out-of-band errors, which carry no content).

The gateway's prefix signatures (``shared.prefix``) and an Idempotency-Key's body digest
are keyed with keys derived from the payload keys, so a guessed prompt cannot be confirmed
against them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmq.shared import protocol as p
from llmq.shared.errors import PayloadUndecryptable

logger = logging.getLogger(__name__)

MARK = b"~1"  # what a sealed value starts with (plain JSON and ids never do)
_KID_HEX = 8
_HEAD = len(MARK) + _KID_HEX
_NONCE = 12
KEY_BYTES = 32
PLAIN = "none"  # PAYLOAD_KEYS=none: keep payloads in clear (a deliberate choice)


def new_key() -> str:
    """A new payload key: 32 random bytes in URL-safe base64 (44 characters)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def parse_keys(value: str) -> list[bytes]:
    """``PAYLOAD_KEYS`` (comma- or space-separated keys) -> the keys, first one first.
    ``none`` -> no keys. Raises ValueError naming the key's position, never its value."""
    parts = [x for x in re.split(r"[\s,]+", value.strip()) if x]
    if parts == [PLAIN]:
        return []
    if not parts:
        raise ValueError(f"is empty: give one or more keys, or {PLAIN!r}")
    out = []
    for i, part in enumerate(parts, 1):
        try:
            key = base64.urlsafe_b64decode(part.encode("ascii") + b"=" * (-len(part) % 4))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ValueError(
                f"key {i} of {len(parts)} is not {KEY_BYTES} bytes in URL-safe base64 "
                "(make one with: llmq-keys payload-key)"
            )
        out.append(key)
    if len(set(out)) != len(out):
        raise ValueError("a key is listed twice")
    return out


def key_id(key: bytes) -> bytes:
    """A key's public id (8 hex digits): which key sealed a value, without revealing it."""
    return hashlib.sha256(b"llmq payload key id:" + key).hexdigest()[:_KID_HEX].encode()


def log_keys(sealer: Sealer) -> None:
    """One start-up line: which key seals (its id, never the key), or a warning."""
    if sealer.enabled:
        ids = sealer.key_ids
        logger.info("payloads sealed with key %s; opened with %s", ids[0], ", ".join(ids))
    else:
        logger.warning("PAYLOAD_KEYS=none: prompts and answers are kept in clear in Redis")


def is_sealed(data: bytes | str) -> bool:
    return (data.encode() if isinstance(data, str) else data).startswith(MARK)


def key_id_of(sealed: str) -> str:
    """The id of the key that sealed ``sealed`` ("" when it is not sealed)."""
    return sealed[len(MARK) : _HEAD] if is_sealed(sealed) else ""


class Sealer:
    """Seals with the first key, opens with any; without keys it seals nothing (and a
    sealed value does not open)."""

    def __init__(
        self, keys: Sequence[bytes] = (), on_failure: Callable[[], None] | None = None
    ) -> None:
        """``on_failure``: called for every value that does not open (a metric)."""
        self._on_failure = on_failure or (lambda: None)
        self._ciphers = {key_id(k): AESGCM(k) for k in keys}
        self._head = MARK + key_id(keys[0]) if keys else b""
        self._sealer = self._ciphers.get(key_id(keys[0])) if keys else None
        # Keyed prefix signatures and body digests: keys of their own, derived from these.
        self.prefix_key = hashlib.blake2b(b"llmq prefix", key=keys[0]).digest() if keys else b""
        self._digest_keys = [hashlib.blake2b(b"llmq body digest", key=k).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return self._sealer is not None

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys held, the sealing one first (for logs: ids, never keys)."""
        return [k.decode() for k in self._ciphers]

    def seal(self, data: bytes, where: str) -> bytes:
        if self._sealer is None:
            return data
        nonce = os.urandom(_NONCE)
        sealed = self._sealer.encrypt(nonce, data, where.encode())
        return self._head + binascii.b2a_base64(nonce + sealed, newline=False)

    def open(self, data: bytes, where: str) -> bytes:
        """The plain bytes of ``data`` (itself when not sealed). Raises PayloadUndecryptable
        when no key held opens it (another key, or altered or moved bytes)."""
        if not data.startswith(MARK):
            return data
        kid = data[len(MARK) : _HEAD]
        cipher = self._ciphers.get(kid)
        if cipher is None:
            self._on_failure()
            held = "no PAYLOAD_KEYS" if not self._ciphers else f"keys {', '.join(self.key_ids)}"
            raise PayloadUndecryptable(
                f"the payload was sealed with key {kid.decode(errors='replace')}; this "
                f"service holds {held}"
            )
        try:
            raw = binascii.a2b_base64(data[_HEAD:])
            return cipher.decrypt(raw[:_NONCE], raw[_NONCE:], where.encode())
        except Exception:  # InvalidTag, or bytes that are not base64
            self._on_failure()
            raise PayloadUndecryptable(
                f"the payload sealed with key {kid.decode()} does not open: it was altered "
                "or belongs elsewhere"
            ) from None

    def digests(self, raw: bytes) -> list[str]:
        """A request body's digest under each key, the sealing key's first (an
        Idempotency-Key's body check: keyed, so that Redis' copy cannot confirm a guessed
        body; each key's, so that a retry across a rotation still matches). Without keys,
        its SHA-256."""
        if not self._digest_keys:
            return [hashlib.sha256(raw).hexdigest()]
        return [hmac.new(k, raw, hashlib.sha256).hexdigest() for k in self._digest_keys]

    def seal_text(self, text: str, where: str) -> str:
        return self.seal(text.encode(), where).decode() if text and self.enabled else text

    def open_text(self, text: str, where: str) -> str:
        return self.open(text.encode(), where).decode()

    # -- jobs and events ---------------------------------------------------------------
    def seal_spec(self, spec: p.JobSpec) -> p.JobSpec:
        """The job as it goes into Redis: its body sealed into ``sealed``."""
        if not self.enabled or spec.sealed:
            return spec
        body = p.json_dumps(spec.body)
        sealed = self.seal(body, f"body:{spec.id}").decode()
        return spec.model_copy(update={"body": {}, "sealed": sealed, "body_bytes": len(body)})

    def open_spec(self, spec: p.JobSpec) -> p.JobSpec:
        """The job with its body back (raises PayloadUndecryptable)."""
        if not spec.sealed:
            return spec
        body = p.json_loads(self.open(spec.sealed.encode(), f"body:{spec.id}"))
        if not isinstance(body, dict):
            raise PayloadUndecryptable("the sealed body is not a request")
        return spec.model_copy(update={"body": body, "sealed": "", "body_bytes": 0})

    def seal_event(self, job_id: str, data: bytes) -> bytes:
        return self.seal(data, f"event:{job_id}")

    def open_event(self, job_id: str, event: p.Event) -> p.Event:
        if not event.data.startswith(MARK):
            return event
        return p.Event(event.seq, event.type, self.open(event.data, f"event:{job_id}"))

"""The one settings class, read from environment variables (names fixed by the original design).

Both processes build a ``Settings`` at start-up and pass it down explicitly
(``create_app(settings)``, ``build_worker(settings)``); nothing reads the environment later.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Annotated, Literal, TypedDict

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llmq.shared.sealing import PLAIN, Sealer, parse_keys

ENGINE_PROBE_TIMEOUT_S = 2.0

# Request fields passed on to the engine by default: OpenAI's sampling and output options,
# and vLLM's per-request sampling extensions. Not here, so refused with a 400: fields that
# reach beyond one request or the engine's configuration (kv_transfer_params, request_id,
# chat_template, chat_template_kwargs, priority, cache_salt, mm_processor_kwargs, ...) and
# regex/grammar decoding (a pathological regex can stall the engine).
DEFAULT_PASSTHROUGH = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "stop",
    "user",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "metadata",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "min_tokens",
    "ignore_eos",
    "guided_json",
    "guided_choice",
)


class RedisAuth(TypedDict, total=False):
    username: str
    password: str


class Settings(BaseSettings):
    """Every knob of the service. Environment variable = field name in upper case."""

    model_config = SettingsConfigDict(case_sensitive=False, frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis ACL user and password; kept out of REDIS_URL so no URL carries a secret.
    redis_username: str | None = None
    redis_password: SecretStr | None = None  # never printed
    redis_timeout_s: float = Field(
        1.0, gt=0, le=60, description="bound on one Redis command (a frozen Redis: 503 fast)"
    )
    # High availability (README, "High availability"): with REDIS_SENTINELS set, the primary
    # is found through Sentinel (REDIS_URL's host and port are not used; its database is).
    redis_sentinels: str = Field("", description="host:port,host:port,... of the sentinels")
    redis_sentinel_master: str = Field("mymaster", min_length=1, description="the monitored name")
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own password; not printed
    redis_min_replicas_ack: int = Field(
        0, ge=0, le=16, description="replicas that must have a job before it is admitted (WAIT)"
    )
    redis_wait_timeout_s: float = Field(
        0.5, gt=0, le=60, description="how long an admission waits for those replicas"
    )
    # Prompts and answers at rest (ARCHITECTURE.md, "Payloads at rest"): the first key
    # seals, every key opens. Required by llmq-gateway and llmq-worker; "none" keeps
    # payloads in clear. Never printed.
    payload_keys: SecretStr | None = None

    # Backpressure (ARCHITECTURE.md, "Admission and the bound").
    max_active: int = Field(
        8,
        ge=1,
        le=4096,
        description="slots per worker; auto: sized to the engine (MAX_ACTIVE_CEILING at most, "
        "the time per token within TPOT_OBJECTIVE_MS)",
    )
    # MAX_ACTIVE=auto (ARCHITECTURE.md, "Scheduling to service levels"): set from it, not
    # from a variable of its own. max_active is then the ceiling.
    adaptive_slots: bool = Field(False, exclude=True)
    max_active_ceiling: int = Field(
        64, ge=1, le=4096, description="MAX_ACTIVE=auto: the most slots a worker grows to"
    )
    tpot_objective_ms: float = Field(
        0.0,
        ge=0,
        le=60_000,
        description="MAX_ACTIVE=auto: the engine's time per output token a worker keeps its "
        "load within (0: off)",
    )
    queue_mode: Literal["queue", "reject"] = "queue"
    queue_max: int = Field(64, ge=0, le=1_000_000)
    queue_timeout_s: float = Field(30.0, gt=0, le=86_400)
    request_timeout_s: float = Field(300.0, gt=0, le=86_400)
    retry_after_s: int = Field(
        1, ge=1, le=3600, description="Retry-After on 429 before the model's service time is known"
    )
    queue_predict: bool = Field(
        True, description="queue mode: refuse at once (503) a request expected to wait too long"
    )
    queue_fair_share: bool = Field(
        True, description="queue mode: a full queue gives a place of the most-queued key to others"
    )

    # Fleets: several models (ARCHITECTURE.md, "Fleets: models and routing").
    # JSON objects; an empty value is {} (compose passes unset variables as "").
    queue_max_per_model: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description='QUEUE_MAX per model, JSON: {"served-name": 16}'
    )
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description='public names of served models, JSON: {"gpt-4o-mini": "Qwen2.5-7B-Instruct"}',
    )
    model_fallbacks: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=dict,
        description="JSON object: model -> the models (in order) that take its requests when "
        'it has no ready engine or cannot take them in time: {"big": ["small"]}',
    )
    model_memory_s: float = Field(
        3600.0,
        gt=0,
        le=30 * 86_400,
        description="a model no live worker serves is still known (503, not 404) this long",
    )
    # Time-to-first-token objectives per band (ARCHITECTURE.md, "Scheduling to service
    # levels"), JSON: {"high": 500, "normal": 2000}; a key's and a request's come first.
    ttft_objective_ms: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description='default time-to-first-token objective per band, JSON: {"high": 500}',
    )
    scale_target_wait_s: float = Field(
        10.0, gt=0, le=3600, description="the wait the scaling signal sizes a model's workers for"
    )
    # Comma-separated served names; an empty value is none.
    scale_to_zero_models: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="models an autoscaler may leave without workers: always known, and "
        "their requests wait in the queue for a worker to start instead of a 503",
    )

    # Gateway.
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(8080, ge=1, le=65_535)
    gateway_processes: int = Field(
        1, ge=1, le=256, description="gateway processes sharing the port (one supervisor)"
    )
    gateway_metrics_port: int = Field(
        9101, ge=0, le=65_535, description="Prometheus metrics, off the public port; 0 disables"
    )
    auth: Literal["keys", "none"] = Field(
        "keys", description="keys: every /v1 route needs an API key; none: open (warned)"
    )
    docs_enabled: bool = Field(False, description="serve /docs and /openapi.json")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_connections: int = Field(
        1000, ge=10, le=1_000_000, description="open connections per gateway process (503)"
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, le=1024 * 1024, description="request line + headers (431)"
    )
    max_headers: int = Field(100, ge=10, le=10_000, description="headers per request (431)")
    client_head_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a connection's request head must arrive within (408)"
    )
    client_body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a request body must arrive within, after its head"
    )
    max_messages: int = Field(2048, ge=1, le=1_000_000, description="messages per request")
    max_json_containers: int = Field(
        50_000, ge=100, description="'{' and '[' in one body, strings included"
    )
    passthrough_fields: frozenset[str] = Field(
        frozenset(DEFAULT_PASSTHROUGH),
        description="request fields passed on to the engine besides the ones the gateway reads",
    )
    passthrough_extra: frozenset[str] = Field(
        frozenset(), description="more fields to pass on (e.g. a test engine's knobs)"
    )
    max_n: int = Field(1, ge=1, le=16, description="choices per request (n)")
    max_tokens_cap: int = Field(
        0, ge=0, description="cap on max_tokens; 0: the engine's max_model_len"
    )
    allow_media: bool = Field(False, description="accept image/audio parts in messages")
    max_prompt_chars: int = Field(
        2_000_000, ge=1, description="characters in all messages of one request"
    )
    trace_content: bool = Field(
        False,
        description="tracing: put prompts and answers in spans (GenAI content attributes); "
        "off: no span holds either (tracing itself: the standard OTEL_* variables)",
    )
    embed_batch_max_inputs: int = Field(
        256,
        ge=1,
        le=65_536,
        description="inputs in one engine request of merged embedding jobs (worker)",
    )
    drain_timeout_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="a stopping worker's jobs this long to end; then, with MIGRATE on, "
        "they are handed over to another worker (else cut)",
    )
    migrate: bool = Field(
        True,
        description="a started job whose worker is lost, whose engine fails, or whose worker "
        "drains past DRAIN_TIMEOUT_S continues on another worker (off: it ends)",
    )
    migrate_max: int = Field(
        2, ge=0, le=10, description="migrations one job may have; then it ends (worker_lost)"
    )
    engine_stall_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="a streamed job with no engine token for this long counts as an engine "
        "failure (its jobs migrate; the worker is not ready until the engine answers); 0: off",
    )
    store_ttl_s: float = Field(
        3600.0, gt=0, le=7 * 86_400, description="how long store:true results are kept"
    )
    file_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="one uploaded batch input file (POST /v1/files)"
    )
    batch_max_lines: int = Field(50_000, ge=1, le=1_000_000, description="requests per batch")
    file_ttl_s: float = Field(
        3 * 86_400, gt=0, description="how long uploaded and result files are kept"
    )
    batch_max_inflight: int = Field(
        256, ge=1, le=10_000, description="a batch's requests queued or running at once"
    )
    batch_feed_s: float = Field(0.5, gt=0, le=60, description="how often workers feed batches")
    store_max_tokens: int = Field(
        0, ge=0, description="max_tokens a store:true request must set, at most; 0: no own cap"
    )
    registry_refresh_s: float = Field(0.5, gt=0, le=60)
    client_send_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a stream the client leaves unread this long ends"
    )
    responses_builtin_tools: Literal["omit", "reject"] = Field(
        "omit",
        description="Responses API: built-in tools this service cannot run (web_search, ...) "
        "are left out of what the engine sees (omit) or refused with a 400 (reject)",
    )
    sse_ping_s: float = Field(
        15.0,
        ge=0.05,
        le=3600,
        description="a streamed answer sends a keep-alive comment this "
        "often (proxies close connections that stay silent)",
    )

    # Worker.
    vllm_url: str = "http://127.0.0.1:8000"
    vllm_api_key: SecretStr | None = None  # never printed (repr shows **********)
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    worker_processes: int = Field(
        1, ge=1, le=256, description="worker processes for one engine, splitting MAX_ACTIVE"
    )
    engine_priority: bool = Field(
        False,
        description="pass each job's band on as vLLM's request priority (an engine started "
        "with --scheduling-policy priority favours high-band jobs inside its batch)",
    )
    # Streamed deltas under load (ARCHITECTURE.md, "The token path and its cost"): a busy
    # worker asks the engine for several tokens per delta (vLLM's stream_interval).
    stream_frame_ms: int = Field(
        50,
        ge=0,
        le=1000,
        description="while busy, the engine batches the tokens it makes in this time into one "
        "streamed delta (the first token is never held); 0: one delta per token always",
    )
    stream_batch_from: int = Field(
        16, ge=1, le=4096, description="jobs running on a worker from which it batches deltas"
    )
    # Cache-aware pickup (ARCHITECTURE.md, "Cache-aware pickup"): gateways sign each job's
    # prompt prefix, workers prefer the jobs their engine holds the prefix of.
    prefix_affinity: bool = Field(
        True, description="on: a job goes to the worker whose engine caches its prompt's prefix"
    )
    affinity_max_wait_ms: int = Field(
        50, ge=0, le=10_000, description="longest a job is left for a warm worker's free slot"
    )
    affinity_record_max: int = Field(
        4096,
        ge=16,
        le=1_000_000,
        description="prefix blocks (~256 tokens each) a worker remembers its engine holding: "
        "about the engine's KV cache size",
    )
    affinity_ttl_s: float = Field(
        600.0, gt=0, le=86_400, description="a worker forgets a prefix it has not served this long"
    )
    worker_metrics_port: int = Field(9100, ge=0, le=65_535, description="0 disables")
    worker_metrics_host: str = Field(
        "0.0.0.0", description="address of the metrics port (the local run: 127.0.0.1)"
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60)
    orphan_grace_s: float = Field(10.0, gt=0, le=3600)
    wake_fallback_s: float = Field(1.0, gt=0, le=60)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["plain", "json"] = Field(
        "plain", description="plain text lines, or JSON lines for log shippers"
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @field_validator("vllm_url")
    @classmethod
    def _check_vllm_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url

    @model_validator(mode="before")
    @classmethod
    def _max_active_auto(cls, data: object) -> object:
        # MAX_ACTIVE=auto: slots sized by the worker (worker.slots), up to the ceiling.
        if isinstance(data, dict):
            value = data.get("max_active")
            if isinstance(value, str) and value.strip().lower() == "auto":
                data = {**data, "adaptive_slots": True}
                data["max_active"] = data.get("max_active_ceiling", 64)
        return data

    @field_validator(
        "queue_max_per_model",
        "model_aliases",
        "ttft_objective_ms",
        "model_fallbacks",
        mode="before",
    )
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("scale_to_zero_models", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
        return value

    @field_validator("queue_max_per_model")
    @classmethod
    def _check_queue_max_per_model(cls, value: dict[str, int]) -> dict[str, int]:
        if any(n < 0 for n in value.values()):
            raise ValueError("queue places cannot be negative")
        return value

    @field_validator("model_aliases")
    @classmethod
    def _check_aliases(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, target in value.items():
            if not alias or not target or alias == target:
                raise ValueError(f"alias {alias!r} must name another, non-empty model")
            if target in value:
                raise ValueError(f"alias {alias!r} names an alias ({target!r}): name the model")
        return value

    @field_validator("model_fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for model, others in value.items():
            if not model or any(not m or m == model for m in others):
                raise ValueError(f"the fallbacks of {model!r} must name other, non-empty models")
            if len(set(others)) != len(others):
                raise ValueError(f"the fallbacks of {model!r} name a model twice")
        return value

    @field_validator("ttft_objective_ms")
    @classmethod
    def _check_objectives(cls, value: dict[str, int]) -> dict[str, int]:
        bands = {"high", "normal", "low"}
        for band, ms in value.items():
            if band not in bands:
                raise ValueError(f"{band!r} is not a band (high, normal, low)")
            if not 0 < ms <= 86_400_000:
                raise ValueError(f"the objective of {band!r} must be 1..86400000 ms")
        return value

    @model_validator(mode="after")
    def _auto_needs_an_objective(self) -> Settings:
        if self.adaptive_slots and not self.tpot_objective_ms:
            raise ValueError("MAX_ACTIVE=auto needs TPOT_OBJECTIVE_MS (the time per token to keep)")
        return self

    def queue_max_for(self, model: str) -> int:
        """The model's queue places: QUEUE_MAX_PER_MODEL's, else QUEUE_MAX."""
        return self.queue_max_per_model.get(model, self.queue_max)

    @field_validator("payload_keys")
    @classmethod
    def _check_payload_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_keys(value.get_secret_value())  # its message names a position, not a key
        return value

    def payload_key_list(self) -> list[bytes]:
        """PAYLOAD_KEYS decoded, the sealing key first (empty: unset or ``none``)."""
        return [] if self.payload_keys is None else parse_keys(self.payload_keys.get_secret_value())

    def sealer(self, on_failure: Callable[[], None] | None = None) -> Sealer:
        """What seals and opens this process's payloads (PAYLOAD_KEYS); ``on_failure``
        counts what does not open."""
        return Sealer(self.payload_key_list(), on_failure)

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            host, _, port = part.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65_536:
                raise ValueError(f"{part!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _wait_within_the_command_bound(self) -> Settings:
        # WAIT's reply comes after its timeout: past REDIS_TIMEOUT_S the read would fail
        # with the job admitted and its client told 503.
        if self.redis_min_replicas_ack and self.redis_wait_timeout_s >= self.redis_timeout_s:
            raise ValueError("REDIS_WAIT_TIMEOUT_S must be below REDIS_TIMEOUT_S")
        return self

    @model_validator(mode="after")
    def _scale_to_zero_needs_queue_places(self) -> Settings:
        # With no worker there are no slots: only queue places hold a request until one starts.
        for model in self.scale_to_zero_models:
            if self.queue_mode != "queue" or self.queue_max_for(model) == 0:
                raise ValueError(
                    f"SCALE_TO_ZERO_MODELS ({model!r}) needs QUEUE_MODE=queue and queue places"
                )
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs (empty: no Sentinel)."""
        out = []
        for part in filter(None, (p.strip() for p in self.redis_sentinels.split(","))):
            host, _, port = part.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    def redis_auth(self) -> RedisAuth:
        """redis-py's ``username``/``password`` keywords, when set (a password in REDIS_URL
        itself takes precedence, as redis-py merges the URL over them)."""
        auth: RedisAuth = {}
        if self.redis_username:
            auth["username"] = self.redis_username
        if self.redis_password is not None:
            auth["password"] = self.redis_password.get_secret_value()
        return auth

    @property
    def heartbeat_ttl_s(self) -> float:
        """A worker is live while its heartbeat is younger than three intervals. The beat
        never waits for the engine probe (that runs on its own), so only a stalled process
        or a lost Redis connection misses three in a row."""
        return self.heartbeat_interval_s * 3

    @property
    def migrations(self) -> int:
        """The migrations a job may have: MIGRATE_MAX, 0 with MIGRATE off."""
        return self.migrate_max if self.migrate else 0


def require_payload_keys(settings: Settings) -> None:
    """A gateway or worker refuses to start without PAYLOAD_KEYS: payloads in clear are a
    choice (``PAYLOAD_KEYS=none``), never a default."""
    if settings.payload_keys is None:
        raise SystemExit(
            "PAYLOAD_KEYS is not set: prompts and answers would be kept in clear in Redis. "
            "Set it to one or more keys (make one with: llmq-keys payload-key), or to "
            f"{PLAIN!r} to keep them in clear."
        )


def load_settings() -> Settings:
    """Read the environment; on a bad value exit with a message naming the variable.

    The message never repeats the value: it may be a secret (a URL with a password, a key).
    """
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "settings"
            lines.append(f"  {name}: {err['msg']}")
        raise SystemExit("invalid configuration:\n" + "\n".join(lines)) from None

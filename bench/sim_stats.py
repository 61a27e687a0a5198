"""What the engine simulator counts (``GET /sim/stats``; ``POST /sim/reset`` zeroes it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SimStats:
    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_abandoned: int = 0
    running: int = 0
    failures_injected: int = 0
    probes: int = 0  # the worker's capability probes (PROBE_HEADER), not in ``requests``
    by_model: dict[str, int] = field(default_factory=dict)  # requests per model asked for
    not_found: int = 0  # requests for a model this engine does not serve (answered 404)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache (as vLLM counts)
    prefix_hits: int = 0  # of those, found cached
    embed_requests: int = 0  # embeddings requests (an embedding engine)
    embed_inputs: int = 0  # inputs they held
    embed_largest: int = 0  # the most inputs in one request

"""The caller of a request, as admission and metrics see it."""

from __future__ import annotations

from dataclasses import dataclass

from llmq.shared.protocol import ApiKey, Band


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller: its key's name (metrics, Redis keys), limits and priority band."""

    name: str
    max_concurrent: int = 0
    rpm: int = 0
    tpm: int = 0
    band: Band = Band.NORMAL
    ttft_objective_ms: int = 0  # its requests' default time-to-first-token objective (0: none)

    @staticmethod
    def of(key: ApiKey) -> Tenant:
        return Tenant(
            key.name, key.max_concurrent, key.rpm, key.tpm, key.priority, key.ttft_objective_ms
        )

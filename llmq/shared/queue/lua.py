"""A Lua script whose KEYS and ARGV have names: bound in its first lines, passed by name.

Every script of the service is a ``Script``, defined in the module of ``shared.queue``
that runs it. Its source starts with
``local <name> = KEYS[i]`` / ``ARGV[i]`` for each declared name, ``local <CONST> = ...`` for
the constants it needs from the Python that owns them (status codes, statuses, key
suffixes), and, when asked, ``now`` (Redis' clock, ms) and the token bucket; the body uses
only those names. A caller passes ``keys=`` and ``args=`` as dicts (``Script.bind`` refuses
a missing or unknown name), so every argument is named where it is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)"

# A token bucket holding up to ``cap`` units, refilled continuously at cap per
# BUCKET_WINDOW_MS: what rpm and tpm limits are measured with (cap 0 = unlimited). ``bucket``
# returns ok (1/0), tokens left (after taking ``cost`` when ok), ms until ``cost`` fits (when
# not), ms until the bucket is full again; ``refilled`` is what a bucket holds now.
BUCKET = """
local BUCKET_WINDOW_MS = 60000
local BUCKET_TTL_MS = 120000
local function refilled(key, cap)
  local h = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  return math.min(cap, tokens + (now - ts) * cap / BUCKET_WINDOW_MS)
end
local function bucket(key, cap, cost, take)
  if cap <= 0 then return 1, -1, 0, 0 end
  local tokens = refilled(key, cap)
  cost = math.min(cost, cap)
  local ok = tokens >= cost
  if ok and take then
    tokens = tokens - cost
    redis.call('HSET', key, 't', tokens, 'ts', now)
    redis.call('PEXPIRE', key, BUCKET_TTL_MS)
  end
  local wait = 0
  if not ok then wait = math.ceil((cost - tokens) * BUCKET_WINDOW_MS / cap) end
  return ok and 1 or 0, math.floor(tokens), wait,
    math.ceil((cap - tokens) * BUCKET_WINDOW_MS / cap)
end
"""


def _literal(value: str | int | tuple[str, ...]) -> str:
    if isinstance(value, tuple):  # a Lua list
        return "{" + ", ".join(json.dumps(v) for v in value) + "}"
    return str(value) if isinstance(value, int) else json.dumps(str(value))


@dataclass(frozen=True)
class Script:
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    rest: str = ""  # a Lua table of the ARGV after ``args`` (field/value pairs, ids, ...)
    consts: Mapping[str, str | int | tuple[str, ...]] = field(default_factory=dict)
    clock: bool = False  # ``now``, from Redis' TIME: hosts with different clocks agree
    bucket: bool = False  # the token bucket functions (needs the clock)

    @property
    def source(self) -> str:
        lines = [f"local {name} = KEYS[{i}]" for i, name in enumerate(self.keys, 1)]
        lines += [f"local {name} = ARGV[{i}]" for i, name in enumerate(self.args, 1)]
        if self.rest:
            lines.append(f"local {self.rest} = {{unpack(ARGV, {len(self.args) + 1})}}")
        lines += [f"local {name} = {_literal(v)}" for name, v in self.consts.items()]
        if self.clock or self.bucket:
            lines.append(NOW)
        if self.bucket:
            lines.append(BUCKET.strip())
        return "\n".join(lines) + "\n" + self.body.strip() + "\n"

    def bind(
        self, keys: Mapping[str, str], args: Mapping[str, Any], rest: Sequence[Any] = ()
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV in the script's order, from arguments passed by name."""
        for what, given, declared in (("keys", keys, self.keys), ("args", args, self.args)):
            if set(given) != set(declared):
                missing, unknown = set(declared) - set(given), set(given) - set(declared)
                raise TypeError(
                    f"script {what}: missing {sorted(missing)}, unknown {sorted(unknown)}"
                )
        if rest and not self.rest:
            raise TypeError("this script takes no trailing arguments")
        return [keys[k] for k in self.keys], [args[a] for a in self.args] + list(rest)


class Registered:
    """A ``Script`` loaded into one Redis client (EVALSHA, reloaded if Redis lost it)."""

    def __init__(self, redis: Redis, script: Script) -> None:
        self.script = script
        self._call = redis.register_script(script.source)

    async def __call__(
        self,
        *,
        keys: Mapping[str, str],
        args: Mapping[str, Any],
        rest: Sequence[Any] = (),
        client: Any = None,
    ) -> Any:
        """Run it; with ``client`` a pipeline, queue it there (its result comes with the
        pipeline's)."""
        ordered_keys, argv = self.script.bind(keys, args, rest)
        return await self._call(keys=ordered_keys, args=argv, client=client)

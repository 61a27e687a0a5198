"""Who is calling: the API key in ``Authorization: Bearer <key>`` names a tenant.

With AUTH=keys (the default) every ``/v1/*`` route needs a key that the operator created
(``llmq-keys create``); missing, unknown or revoked keys get 401 ``invalid_api_key``. Keys
are looked up in Redis on every request (one HGETALL), so a revocation holds on every
gateway at once. With AUTH=none every caller is the tenant ``anonymous`` with no limits
(logged as a warning at start-up).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from llmq.gateway.state import GatewayState, StateDep
from llmq.gateway.tenant import Tenant
from llmq.shared.errors import InvalidApiKey
from llmq.shared.protocol import ANONYMOUS

OPEN = Tenant(ANONYMOUS)


async def authenticate(st: GatewayState, authorization: str | None) -> Tenant:
    if st.settings.auth == "none":
        return OPEN
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        )
    key = await st.keys.lookup(secret)
    if key is None:
        raise InvalidApiKey("Incorrect API key provided, or the key was revoked.")
    return Tenant.of(key)


async def get_tenant(request: Request, st: StateDep) -> Tenant:
    tenant = await authenticate(st, request.headers.get("authorization"))
    request.state.tenant = tenant.name  # for the access metrics
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]

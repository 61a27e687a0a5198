#!/bin/sh
# Fill compose/.env's empty secrets with random values:  cd compose && bash secrets.sh
# Creates .env from .env.example when there is none. Only empty secrets are filled, so it is
# safe to run again; it prints the names it filled, never a value.
set -eu
cd "$(dirname "$0")"
[ -f .env ] || cp .env.example .env
chmod 600 .env
for name in REDIS_ADMIN_PASSWORD REDIS_GATEWAY_PASSWORD REDIS_WORKER_PASSWORD VLLM_API_KEY \
    GRAFANA_ADMIN_PASSWORD REDIS_SENTINEL_PASSWORD; do
    if grep -q "^$name=$" .env; then
        value=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
        sed -i "s/^$name=$/$name=$value/" .env
        echo "secrets.sh: $name set"
    elif ! grep -q "^$name=" .env; then
        value=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
        echo "$name=$value" >>.env
        echo "secrets.sh: $name added"
    fi
done
# The payload key: 32 random bytes in URL-safe base64 (the format PAYLOAD_KEYS takes).
payload_key=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_')
if grep -q "^PAYLOAD_KEYS=$" .env; then
    sed -i "s/^PAYLOAD_KEYS=$/PAYLOAD_KEYS=$payload_key/" .env
    echo "secrets.sh: PAYLOAD_KEYS set"
elif ! grep -q "^PAYLOAD_KEYS=" .env; then
    echo "PAYLOAD_KEYS=$payload_key" >>.env
    echo "secrets.sh: PAYLOAD_KEYS added"
fi

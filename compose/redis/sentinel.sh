#!/bin/sh
# Entrypoint of the sentinels (compose's profile "ha"; the Helm chart ships this file):
# writes the sentinel's config (it rewrites it as it learns the topology) and runs
# redis-server in sentinel mode. It watches the primary LLMQ_REDIS_PRIMARY (compose: `redis`;
# quorum 2 of the three sentinels; down after SENTINEL_DOWN_AFTER_MS), logs in to the
# servers as admin, and asks clients for REDIS_SENTINEL_PASSWORD. The chart also sets
# LLMQ_SENTINEL_ANNOUNCE (this sentinel's pod DNS name) and LLMQ_SENTINEL_DISCOVER (the
# sentinels' Service): a sentinel that starts afresh asks its peers for the primary.
set -eu
for var in REDIS_ADMIN_PASSWORD REDIS_SENTINEL_PASSWORD; do
    eval "value=\${$var:-}"
    case $value in
        "") echo "sentinel: $var is not set (bash secrets.sh fills it)" >&2; exit 1 ;;
        *[!A-Za-z0-9_-]*) echo "sentinel: $var may hold only letters, digits, - and _" >&2; exit 1 ;;
    esac
done
conf=${LLMQ_SENTINEL_CONF:-/data/sentinel.conf}
umask 077
primary="${LLMQ_REDIS_PRIMARY:-redis} 6379"
if [ ! -f "$conf" ] && [ -n "${LLMQ_SENTINEL_DISCOVER:-}" ]; then
    . "$(dirname "$0")/discover.sh"
    found=$(ask_sentinels)
    if [ -n "$found" ]; then primary=$found; fi
fi
# Written once: afterwards the file is the sentinel's own record of who is primary (after a
# failover, not `redis`); delete the volume to start over.
[ -f "$conf" ] || cat >"$conf" <<CONF
port ${LLMQ_SENTINEL_PORT:-26379}
requirepass $REDIS_SENTINEL_PASSWORD
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
${LLMQ_SENTINEL_ANNOUNCE:+sentinel announce-ip $LLMQ_SENTINEL_ANNOUNCE}
sentinel monitor mymaster $primary 2
sentinel auth-user mymaster admin
sentinel auth-pass mymaster $REDIS_ADMIN_PASSWORD
sentinel down-after-milliseconds mymaster ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout mymaster 60000
sentinel parallel-syncs mymaster 1
CONF
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
    chown redis "$conf"
fi
exec docker-entrypoint.sh redis-server "$conf" --sentinel

#!/bin/sh
# Entrypoint of the Redis servers (compose's redis services; the Helm chart's, which ships
# this file). Writes Redis's ACL file from the three passwords in the environment, then runs
# the given command (the image's docker-entrypoint.sh redis-server ...) with --aclfile
# appended.
#
#   default  off: a client that has not authenticated can run nothing (NOAUTH)
#   admin    everything (operators: docker compose exec redis redis-cli --user admin)
#   gateway  the gateway (and llmq-keys): llmq:* keys, arq's job and in-progress keys and
#            its abort set; llmq:* channels; INFO (its replication metrics)
#   worker   the worker: llmq:* and arq:* keys, llmq:* channels, INFO (arq logs it)
#
# Both services get the data commands, Lua, transactions and pub/sub, and none of the
# @dangerous ones (FLUSHALL, KEYS, CONFIG, DEBUG, SHUTDOWN, MONITOR, ACL, CLIENT KILL, ...)
# or SCRIPT FLUSH / FUNCTION. Passwords are stored as SHA-256 hashes; they may hold letters,
# digits, - and _ (at least 16), which keeps them safe in the ACL file and in URLs.
set -eu

acl_file=${LLMQ_REDIS_ACL_FILE:-/run/llmq/users.acl}

for var in REDIS_ADMIN_PASSWORD REDIS_GATEWAY_PASSWORD REDIS_WORKER_PASSWORD; do
    eval "value=\${$var:-}"
    case $value in
        "") echo "redis: $var is not set (put a long random value in compose/.env)" >&2; exit 1 ;;
        *[!A-Za-z0-9_-]*) echo "redis: $var may hold only letters, digits, - and _" >&2; exit 1 ;;
    esac
    if [ "${#value}" -lt 16 ]; then
        echo "redis: $var must be at least 16 characters" >&2
        exit 1
    fi
done

hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

common="resetchannels -@all +@connection +@read +@write +@keyspace +@scripting +@pubsub"
common="$common +@transaction +time -@dangerous -script|flush -script|kill -function"

mkdir -p "$(dirname "$acl_file")"
umask 077
cat >"$acl_file" <<ACL
user default off
user admin on #$(hash "$REDIS_ADMIN_PASSWORD") ~* &* +@all
user gateway on #$(hash "$REDIS_GATEWAY_PASSWORD") $common +info ~llmq:* ~arq:job:* ~arq:in-progress:* ~arq:abort &llmq:*
user worker on #$(hash "$REDIS_WORKER_PASSWORD") $common +info ~llmq:* ~arq:* &llmq:*
ACL
# docker-entrypoint.sh starts redis-server as the redis user: let it read the file.
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
    chown redis "$acl_file"
fi
# High availability (the compose profile "ha", the chart's Sentinel topology): every server
# may become a replica after a failover, so each one knows how to log in to a primary (as
# admin) and how to name itself (LLMQ_REDIS_ANNOUNCE: its service or pod DNS name). Kept in
# a file, not on the command line.
#
# Which primary: LLMQ_REDIS_REPLICA_OF (none: this one is the primary). With
# LLMQ_SENTINEL_DISCOVER=host:port (the chart: its sentinels' Service), the sentinels are
# asked first: after a failover the primary is whichever they promoted, and a restarted
# former primary must come back as its replica, not as a second primary.
replica_of=${LLMQ_REDIS_REPLICA_OF:+$LLMQ_REDIS_REPLICA_OF 6379}
if [ -n "${LLMQ_SENTINEL_DISCOVER:-}" ]; then
    . "$(dirname "$0")/discover.sh"
    found=$(ask_sentinels)
    if [ -n "$found" ]; then replica_of=$found; else echo "redis: no sentinel names a primary yet" >&2; fi
fi
# Itself (its own name and port, LLMQ_REDIS_PORT): it is the primary.
if [ "$replica_of" = "${LLMQ_REDIS_ANNOUNCE:-} ${LLMQ_REDIS_PORT:-6379}" ]; then replica_of=""; fi
if [ -n "${LLMQ_REDIS_ANNOUNCE:-}" ]; then
    ha_file="$(dirname "$acl_file")/ha.conf"
    {
        echo "masteruser admin"
        echo "masterauth $REDIS_ADMIN_PASSWORD"
        echo "replica-announce-ip $LLMQ_REDIS_ANNOUNCE"
        if [ -n "${LLMQ_REDIS_PORT:-}" ]; then echo "replica-announce-port $LLMQ_REDIS_PORT"; fi
        echo "min-replicas-to-write ${REDIS_MIN_REPLICAS_TO_WRITE:-0}"
        echo "min-replicas-max-lag 10"
        if [ -n "$replica_of" ]; then echo "replicaof $replica_of"; fi
    } >"$ha_file"
    if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
        chown redis "$ha_file"
    fi
    exec "$@" --aclfile "$acl_file" --include "$ha_file"
fi
exec "$@" --aclfile "$acl_file"

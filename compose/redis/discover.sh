# Sourced by acl.sh and sentinel.sh when LLMQ_SENTINEL_DISCOVER=host:port names sentinels
# (the Helm chart: its sentinels' Service). Defines ask_sentinels, which prints the primary
# they name for LLMQ_SENTINEL_MASTER (default mymaster) as "host port", or nothing when none
# answers (a first install: nothing runs yet) or the answer is not an address.
ask_sentinels() {
    if [ -n "${REDIS_SENTINEL_PASSWORD:-}" ]; then export REDISCLI_AUTH="$REDIS_SENTINEL_PASSWORD"; fi
    answer=$(timeout 5 redis-cli --no-auth-warning -h "${LLMQ_SENTINEL_DISCOVER%:*}" \
        -p "${LLMQ_SENTINEL_DISCOVER##*:}" \
        SENTINEL get-master-addr-by-name "${LLMQ_SENTINEL_MASTER:-mymaster}" 2>/dev/null \
        | tr '\n' ' ') || answer=""
    unset REDISCLI_AUTH
    # shellcheck disable=SC2086
    set -- $answer
    [ "$#" -eq 2 ] || return 0
    case $1 in "" | *[!A-Za-z0-9.:-]*) return 0 ;; esac
    case $2 in "" | *[!0-9]*) return 0 ;; esac
    echo "$1 $2"
}

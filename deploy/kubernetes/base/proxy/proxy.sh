#!/bin/sh
# The auth proxy container's command and pre-stop hook (POSIX sh: it runs in the nginx image).
#
#   proxy.sh start   render nginx.conf.template and the Secret's keys into $NGINX_PREFIX, exec nginx
#   proxy.sh drain   pre-stop: wait $DRAIN_DELAY_SECONDS, then stop nginx gracefully and wait for it
#
# Settings (environment; the Deployment sets them, tests/e2e/test_k8s_auth_proxy.py sets its own):
#   PROXY_LISTEN   nginx `listen` of the inference server (pod: 8000)
#   PROBE_LISTEN   nginx `listen` of kubelet's probes (pod: 8001)
#   TS_INFERENCE   TorchServe's inference address, host:port (pod: 127.0.0.1:8080)
#   API_KEY_DIR    the Secret's volume: every file in it is one accepted key (pod: /etc/gpt2-serve/api-keys)
#   NGINX_PREFIX   a writable folder for the rendered config, pid file and temp files (pod: /tmp/nginx)
#   DRAIN_DELAY_SECONDS  how long to keep serving after the pod is marked terminating (pod: 10)
set -eu

HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX="${NGINX_PREFIX:-/tmp/nginx}"
KEY_DIR="${API_KEY_DIR:-/etc/gpt2-serve/api-keys}"
PROXY_LISTEN="${PROXY_LISTEN:-8000}"
PROBE_LISTEN="${PROBE_LISTEN:-8001}"
TS_INFERENCE="${TS_INFERENCE:-127.0.0.1:8080}"
export PROXY_LISTEN PROBE_LISTEN TS_INFERENCE

die() {
    echo "proxy.sh: $*" >&2
    exit 1
}

# One map line per key file (nginx.conf.template says why a regex). A key is what the file holds, less a
# trailing newline. Only RFC 6750's token characters are allowed: they cannot break out of the quoted
# map entry (no quote, backslash, `$`, `;`, `{`, space). A key shorter than 32 characters is refused,
# and so is one longer than 128 (a header of reasonable size).
write_keys() {
    [ -d "$KEY_DIR" ] || die "no key folder $KEY_DIR (is the Secret mounted?)"
    keys="$PREFIX/api-keys.map"
    : >"$keys"
    count=0
    # `*` skips the dot entries (..data, ..2024_...) of a Secret volume; its keys are the symlinks beside them.
    for file in "$KEY_DIR"/*; do
        [ -f "$file" ] || continue
        key="$(cat "$file")"
        case "$key" in
            *[!A-Za-z0-9._~+/=-]*) die "$file: a key may hold only A-Z a-z 0-9 . _ ~ + / = - (one line)" ;;
        esac
        [ "${#key}" -ge 32 ] || die "$file: a key must have at least 32 characters (openssl rand -hex 32)"
        [ "${#key}" -le 128 ] || die "$file: a key may have at most 128 characters"
        # `.` and `+` are the only regex metacharacters a key may hold: each becomes a one-character class.
        printf '"~^(?i:bearer) +%s$" 1;\n' "$(printf '%s' "$key" | sed 's/[.+]/[&]/g')" >>"$keys"
        count=$((count + 1))
    done
    [ "$count" -gt 0 ] || die "no key in $KEY_DIR: create the Secret (see docs/kubernetes.md, step 2)"
    echo "proxy.sh: $count key(s) accepted" >&2
}

start() {
    umask 077  # the rendered keys are for this user only
    mkdir -p "$PREFIX"
    write_keys
    # Only these three variables are substituted: nginx's own $variables stay as they are.
    # shellcheck disable=SC2016  # the single quotes are the point: envsubst gets the names, not values
    envsubst '${PROXY_LISTEN} ${PROBE_LISTEN} ${TS_INFERENCE}' <"$HERE/nginx.conf.template" >"$PREFIX/nginx.conf"
    # -e: the error log before the config is read (the compiled-in path is on the read-only root).
    exec nginx -e stderr -p "$PREFIX/" -c "$PREFIX/nginx.conf" -g 'daemon off;'
}

# Pre-stop. Kubernetes removes the pod from the Service's endpoints at the same time as it runs this
# hook, and the removal takes a few seconds to reach every node: keep serving meanwhile. Then SIGQUIT,
# nginx's graceful stop: it closes its listening sockets, finishes every request in flight (a stream
# included, up to TorchServe's response timeout) and exits. terminationGracePeriodSeconds bounds it all.
drain() {
    sleep "${DRAIN_DELAY_SECONDS:-10}"
    pid="$(cat "$PREFIX/nginx.pid" 2>/dev/null)" || die "no $PREFIX/nginx.pid: nginx is not running"
    kill -QUIT "$pid" 2>/dev/null || exit 0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
    done
}

case "${1:-}" in
    start) start ;;
    drain) drain ;;
    *) die "usage: proxy.sh start|drain" ;;
esac

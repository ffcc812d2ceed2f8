#!/bin/sh
# Probes and pre-stop hook of the torchserve container (POSIX sh + curl, both in the image).
#
#   probe.sh live    liveness: TorchServe's frontend answers /ping at all (any HTTP status)
#   probe.sh ready   startup and readiness: /ping is Healthy AND the model has a READY worker
#   probe.sh drain   pre-stop: wait until no request is in flight, then return (TorchServe is stopped after)
#
# TorchServe listens on the pod's loopback only, with its token auth off (the auth proxy beside it checks
# the keys), so kubelet cannot reach it with an httpGet probe: these run inside the container (exec).
# Why not /ping alone for readiness: TorchServe 0.12 answers Healthy as soon as the frontend is up,
# while the worker is still loading the model (seen: ~10 s for the tiny model, minutes for 3.5B);
# the management API's worker status is what says the model can answer.
#
# Settings (environment; the Deployment sets them, tests/e2e/test_k8s_auth_proxy.py sets its own):
#   TS_INFERENCE, TS_MANAGEMENT   host:port of TorchServe's inference and management APIs
#   TS_METRICS                    host:port of its metrics API (liveness: DescribeJobRepeated)
#   MODEL_NAME                    the model to wait for (the image sets it)
#   DRAIN_PORTS                   local TCP ports whose established connections are requests in flight
#   DRAIN_DELAY_SECONDS           wait this long first (the pod's removal from the endpoints spreads)
set -eu

TS_INFERENCE="${TS_INFERENCE:-127.0.0.1:8080}"
TS_MANAGEMENT="${TS_MANAGEMENT:-127.0.0.1:8081}"
TS_METRICS="${TS_METRICS:-127.0.0.1:8082}"

live() {
    # curl without -f succeeds on any HTTP answer: a worker that is restarting is TorchServe's business
    # (it restarts workers itself); only a frontend that no longer answers is worth a container restart.
    curl -sS -o /dev/null --max-time 5 "http://$TS_INFERENCE/ping"
    # ... or a model wedged by a customized describe (handler/serving/describe_jobs.py): the handler
    # publishes DescribeJobRepeated > 0, and only a restart recovers.
    if curl -sS --max-time 5 "http://$TS_METRICS/metrics?name[]=DescribeJobRepeated" 2>/dev/null \
        | grep -qE '^DescribeJobRepeated(\{[^}]*\})? +[1-9]'; then
        echo "a model is wedged by a customized describe (DescribeJobRepeated > 0): restart" >&2
        return 1
    fi
}

ready() {
    : "${MODEL_NAME:?MODEL_NAME is not set}"
    curl -fsS --max-time 5 "http://$TS_INFERENCE/ping" | grep -q '"Healthy"'
    curl -fsS --max-time 5 "http://$TS_MANAGEMENT/models/$MODEL_NAME" | grep -q '"status": *"READY"'
}

# Established TCP connections whose local port is one of DRAIN_PORTS, from the pod's (shared) network
# namespace: /proc/net/tcp and tcp6 (Java's sockets are IPv6 ones), ports in hex, state 01 = ESTABLISHED.
open_connections() {
    pattern=""
    for port in $DRAIN_PORTS; do
        pattern="$pattern|$(printf '%04X' "$port")"
    done
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        | grep -cE "^ *[0-9]+: [0-9A-F]+:(${pattern#|}) [0-9A-F]+:[0-9A-F]{4} 01 " || true
}

# Pre-stop. The proxy's own pre-stop keeps serving DRAIN_DELAY_SECONDS, then stops gracefully: it stops
# accepting, finishes what is in flight, closes its keep-alive connections and exits. Wait for that:
# until neither the proxy's port (clients) nor TorchServe's (the proxy's upstream connections, one per
# request) has an established connection, twice in a row. Returning lets kubelet stop TorchServe.
drain() {
    : "${DRAIN_PORTS:?DRAIN_PORTS is not set}"
    sleep "${DRAIN_DELAY_SECONDS:-12}"
    quiet=0
    while [ "$quiet" -lt 2 ]; do
        if [ "$(open_connections)" -eq 0 ]; then
            quiet=$((quiet + 1))
        else
            quiet=0
        fi
        sleep 1
    done
}

case "${1:-}" in
    live) live ;;
    ready) ready ;;
    drain) drain ;;
    *) echo "usage: probe.sh live|ready|drain" >&2; exit 2 ;;
esac

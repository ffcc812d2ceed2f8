"""Two replicas behind a Service, for real: two pods' worth of TorchServe (the pod's config) and auth proxy (the
pod's nginx.conf.template and proxy.sh, one Secret's keys for both), on loopback ports, behind a TCP balancer
that does what kube-proxy does for a ClusterIP Service: it picks a replica per TCP *connection* (round-robin,
as IPVS does; iptables mode picks at random) and copies that connection's bytes, never looking at requests.

The client is the official `openai` SDK with its one pooled HTTP client, as applications use it. It keeps its
connections open, so it reaches a new replica only when a connection ends: the proxy's keepalive_requests
and keepalive_time end them (nginx.conf.template says why).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import threading
from dataclasses import dataclass

import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.test_k8s_auth_proxy import (PROXY_FILES, Proxy, access_log_lines, host_port, new_keys,
                                           pod_torchserve, running_proxy)

Backend = tuple[str, int]


class ConnectionBalancer:
    """A per-connection TCP balancer on a free loopback port, run by an asyncio loop in a thread of its own.
    `backends` can be changed while it runs (a scale-up adds an endpoint); `picks` counts connections per
    backend."""

    def __init__(self, backends: list[Backend]):
        self.backends = list(backends)
        self.picks: collections.Counter[Backend] = collections.Counter()
        self._turn = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="balancer", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._connect, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def set_backends(self, backends: list[Backend]) -> None:
        async def swap():
            self.backends = list(backends)
        self._call(swap())

    async def _connect(self, client_reader, client_writer):
        backend = self.backends[self._turn % len(self.backends)]
        self._turn += 1
        self.picks[backend] += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*backend)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(copy(client_reader, upstream_writer), copy(upstream_reader, client_writer))
        for writer in (client_writer, upstream_writer):
            writer.close()

    def close(self) -> None:
        self._server.close()
        self._call(self._server.wait_closed())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from one side to the other until EOF, which is passed on (half-close), as a TCP proxy does."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


@dataclass
class Replica:
    name: str
    ts: object  # gpt2ops.local_server.Server
    proxy: Proxy

    @property
    def endpoint(self) -> Backend:
        return "127.0.0.1", self.proxy.port


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, model_store):
    keys = new_keys()  # one Secret, mounted by every replica's proxy
    with contextlib.ExitStack() as stack:
        pods = []
        for name in ("a", "b"):
            ts = stack.enter_context(pod_torchserve(tmp_path_factory.mktemp(f"replica-{name}"), model_store))
            proxy = stack.enter_context(running_proxy(host_port(ts.client.inference_url), keys))
            pods.append(Replica(name, ts, proxy))
        yield pods


@pytest.fixture
def balancer():
    service = ConnectionBalancer([])
    try:
        yield service
    finally:
        service.close()


def proxy_directive(name: str) -> str:
    """A directive of the proxy's inference server block (nginx.conf.template)."""
    template = (PROXY_FILES / "nginx.conf.template").read_text()
    server = template.split("listen ${PROXY_LISTEN};", 1)[1]
    found = re.search(rf"^\s*{name}\s+(\S+);", server, re.M)
    assert found, f"the proxy does not set {name}: nginx keeps a client's connection for 1000 requests"
    return found[1]


def test_one_pooled_openai_client_is_served_by_both_replicas(replicas, balancer):
    """The HPA adds a replica while a client holds pooled connections to the first one: the client's next
    requests reach both replicas, and none of them fails."""
    first, second = replicas
    per_connection = int(proxy_directive("keepalive_requests"))
    balancer.set_backends([first.endpoint])  # one replica: the client opens its pool
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{balancer.port}/predictions/{MODEL}/1.0/v1",
                           api_key=first.proxy.key(), http_client=openai.DefaultHttpx2Client(), max_retries=0,
                           timeout=60)
    with client:
        assert ask(client, stream=False) and ask(client, stream=False)
        balancer.set_backends([first.endpoint, second.endpoint])  # the HPA added a replica
        before = {r.name: access_log_lines(r.ts) for r in replicas}
        # enough for the connection the pool holds to end at least twice: at least one new connection
        # goes to the new replica, whichever the round-robin's turn
        total = 2 * per_connection + 4
        answered = sum(ask(client, stream=False) for _ in range(total))
        assert ask(client, stream=True) and ask(client, stream=True)  # streams pass through the balancer too
    assert answered == total, f"{total - answered} of {total} requests failed"
    served = {r.name: access_log_lines(r.ts) - before[r.name] for r in replicas}
    assert served[first.name] > 0 and served[second.name] > 0, served
    assert sum(served.values()) == total + 2, served  # each request reached exactly one TorchServe, once
    # The pool kept its connection for many requests: the spread comes from the proxy ending connections,
    # not from a client that reconnects for every request (the SDK ends a connection after a stream: +2).
    connections = sum(balancer.picks.values())
    assert 3 <= connections <= (total + 2) // per_connection + 2 + 2, (connections, dict(balancer.picks))
    assert balancer.picks[second.endpoint] >= 1


def ask(client: openai.OpenAI, stream: bool) -> bool:
    """One short completion, plain or streamed; True when it came back whole."""
    kw = dict(model=MODEL, prompt="你是谁?", max_tokens=2, temperature=0)
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        return any(c.choices and c.choices[0].finish_reason for c in chunks)
    completion = client.completions.create(**kw)
    return completion.choices[0].finish_reason in ("length", "stop")

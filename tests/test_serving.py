"""The metrics/health HTTP server, over a real socket on 127.0.0.1."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from netctl.serving import Serving


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("netctl_test_things", "things counted by the test", registry=registry).inc(3)
    srv = Serving("127.0.0.1", 0, registry=registry)
    srv.start()
    yield srv
    srv.stop()


def test_binds_where_told_on_a_free_port(server):
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_exposes_the_given_registry_only(server):
    status, ctype, body = get(server.url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "netctl_test_things_total 3.0" in body
    assert "process_cpu_seconds_total" not in body  # the global registry is not mixed in


def test_healthz_ok_when_every_check_passes(server):
    server.add_health_check("informers", lambda: True)
    assert get(server.url + "/healthz") == (200, "text/plain", "ok\n")


def test_healthz_names_failing_and_raising_checks(server):
    server.add_health_check("informers", lambda: True)
    server.add_health_check("leader", lambda: False)
    server.add_health_check("ovn", lambda: 1 / 0)
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert "leader" in body and "ovn" in body
    assert "informers" not in body


def test_unknown_path_is_404(server):
    assert get(server.url + "/debug")[0] == 404


def test_stop_closes_the_socket():
    srv = Serving("127.0.0.1", 0, registry=CollectorRegistry())
    srv.start()
    url = srv.url
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=5)

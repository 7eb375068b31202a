"""{"url": ...} without SSRF: every spelling of loopback and private addresses is refused by the
resolved address, at every redirect hop; an explicitly opened range works (a real image server
on 127.0.0.1)."""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from serve.app import Settings, create_app
from serve.errors import ApiError
from serve.remote import RemotePolicy, allowed, fetch
from serve.running import running
from tests import http_server as hs
from tests import images

REFUSED_HOSTS = [
    "127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "017700000001",
    "127.255.255.254", "0.0.0.0", "0", "[::1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]", "[64:ff9b::127.0.0.1]", "[2002:7f00:1::]", "[2002:c0a8:101::]",
    "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "169.254.169.254", "[fe80::1]",
    "[fc00::1]", "[fd12:3456::1]", "224.0.0.1", "[ff02::1]", "240.0.0.1", "255.255.255.255", "198.18.0.1",
    "192.0.2.1", "[2001:db8::1]", "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]",
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_loopback_private_and_reserved_addresses_are_refused_in_every_spelling(host):
    policy = RemotePolicy(enabled=True)
    with pytest.raises(ApiError) as refused:
        fetch(f"http://{host}:9/image.png", policy)
    assert refused.value.status == 403 and refused.value.code == "url_refused", refused.value.message


def test_public_addresses_are_allowed_and_cidrs_open_ranges_exactly():
    policy = RemotePolicy.from_cidrs(True, ["127.0.0.1/32", "10.1.0.0/16"])
    for public in ("8.8.8.8", "2606:4700::1111", "1.1.1.1"):
        assert allowed(ipaddress.ip_address(public), RemotePolicy(enabled=True))
    assert allowed(ipaddress.ip_address("127.0.0.1"), policy)
    assert allowed(ipaddress.ip_address("::ffff:127.0.0.1"), policy)
    assert allowed(ipaddress.ip_address("10.1.2.3"), policy)
    assert not allowed(ipaddress.ip_address("127.0.0.2"), policy)
    assert not allowed(ipaddress.ip_address("10.2.0.1"), policy)
    with pytest.raises(ValueError, match="--remote-allow-cidr"):
        RemotePolicy.from_cidrs(True, ["not-a-cidr"])


@pytest.mark.parametrize(("url", "code"), [
    ("file:///etc/passwd", "bad_url"), ("ftp://example.com/x.png", "bad_url"), ("gopher://127.0.0.1:70/", "bad_url"),
    ("http://user:pw@example.com/x.png", "bad_url"), ("http:///x.png", "bad_url"), ("http://host:99999/", "bad_url"),
    ("not a url", "bad_url"),
])
def test_only_plain_http_and_https_urls(url, code):
    with pytest.raises(ApiError) as refused:
        fetch(url, RemotePolicy(enabled=True))
    assert refused.value.code == code and refused.value.status == 422


@pytest.fixture(scope="module")
def image_server():
    server = hs.Server()
    data = images.rgb_png(5, size=(50, 30))
    server.routes["/cat.png"] = hs.body(data, "image/png")
    server.routes["/big.png"] = hs.body(b"\x89PNG" + b"0" * 300_000, "image/png")
    server.routes["/missing.png"] = hs.status(404)
    server.routes["/slow.png"] = hs.slow(data, 5.0)
    with server:
        port = server.server_address[1]
        server.routes["/to-cat"] = hs.redirect("/cat.png")
        server.routes["/to-other-loopback"] = hs.redirect(f"http://127.0.0.2:{port}/cat.png")
        server.routes["/to-ipv6-loopback"] = hs.redirect(f"http://[::1]:{port}/cat.png")
        server.routes["/to-metadata"] = hs.redirect("http://169.254.169.254/latest/meta-data/")
        server.routes["/to-file"] = hs.redirect("file:///etc/passwd")
        server.routes["/loop"] = hs.redirect("/loop")
        yield server, data


@pytest.fixture(scope="module")
def service(bundles):
    policy = RemotePolicy.from_cidrs(True, ["127.0.0.1/32"], max_bytes=200_000, timeout=1.0)
    with running(create_app(Settings(bundle=bundles["cam"], remote=policy))) as url:
        yield url


def predict(service: str, url: str) -> httpx.Response:
    return httpx.post(service + "/predict", json={"url": url}, timeout=30)


def test_an_opened_range_serves_images_and_follows_safe_redirects(service, image_server):
    server, data = image_server
    direct, redirected = predict(service, server.url("/cat.png")), predict(service, server.url("/to-cat"))
    assert direct.status_code == 200 and redirected.json() == direct.json()


@pytest.mark.parametrize("route", ["/to-other-loopback", "/to-ipv6-loopback", "/to-metadata"])
def test_a_redirect_from_an_allowed_server_to_a_refused_address_is_refused(service, image_server, route):
    server, _ = image_server
    response = predict(service, server.url(route))
    assert response.status_code == 403 and response.json()["error"]["code"] == "url_refused"


@pytest.mark.parametrize(("route", "status", "code"), [
    ("/to-file", 422, "bad_url"), ("/loop", 422, "too_many_redirects"), ("/missing.png", 422, "remote_status"),
    ("/big.png", 413, "too_large"), ("/slow.png", 422, "remote_timeout"),
])
def test_remote_failures_are_4xx_errors(service, image_server, route, status, code):
    server, _ = image_server
    response = predict(service, server.url(route))
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text


def test_unresolvable_hosts_and_refused_hosts_through_the_service(service):
    for url in ("http://127.0.0.2/x.png", "http://[::ffff:127.0.0.2]/x.png", "http://0x7f000002/x.png"):
        response = predict(service, url)
        assert response.status_code == 403 and response.json()["error"]["code"] == "url_refused", url
    response = predict(service, "http://no-such-host.invalid/x.png")
    assert response.status_code == 422 and response.json()["error"]["code"] == "remote_unreachable"

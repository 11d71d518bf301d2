"""
Which outbound proxy an upstream URL goes through, from the environment.
"""

import base64

import pytest

from cargobay.outbound import OutboundProxy, ProxySettings


def settings(**environ: str) -> ProxySettings:
    return ProxySettings.from_environment(environ)


def test_no_variables_no_proxy():
    assert not settings().any
    assert settings().for_uri("https", "registry-1.docker.io") is None


def test_each_scheme_has_its_variable_and_all_proxy_is_the_fallback():
    chosen = settings(HTTPS_PROXY="http://secure:3128", http_proxy="plain:8080", ALL_PROXY="http://every:1")
    assert chosen.for_uri("https", "ghcr.io") == OutboundProxy("secure", 3128)
    assert chosen.for_uri("http", "registry.local") == OutboundProxy("plain", 8080)
    assert settings(ALL_PROXY="http://every:1").for_uri("https", "ghcr.io") == OutboundProxy("every", 1)
    # The lower-case variable wins, as curl and most HTTP clients have it.
    assert settings(https_proxy="http://lower:1", HTTPS_PROXY="http://upper:2").for_uri("https", "x.io").host == "lower"
    assert settings(HTTPS_PROXY="http://noport").for_uri("https", "x.io").port == 80
    secure = settings(HTTPS_PROXY="https://tlsproxy").for_uri("https", "x.io")
    assert (secure.port, secure.tls) == (443, True)
    assert not settings(HTTPS_PROXY="proxy:3128").for_uri("https", "x.io").tls


def test_credentials_in_the_url_become_proxy_authorization():
    proxy = OutboundProxy.parse("http://ci%40corp:p%3Ass@proxy.corp:3128")
    assert base64.b64decode(proxy.authorization.split(b" ")[1]) == b"ci@corp:p:ss"


@pytest.mark.parametrize(
    "value, message",
    [
        ("socks5://proxy:1080", "only http:// and https:// proxies are supported, not socks5://"),
        ("http://user:secret@proxy:port", "its port is not a number"),
        ("http://:3128", "it names no host"),
    ],
)
def test_unusable_proxy_urls_are_refused_without_echoing_a_password(value, message):
    with pytest.raises(ValueError) as caught:
        settings(HTTPS_PROXY=value)
    assert str(caught.value) == f"HTTPS_PROXY: {message}"
    assert "secret" not in str(caught.value)


def test_loopback_is_not_proxied_unless_no_proxy_is_set():
    default = settings(HTTPS_PROXY="http://p:1")
    for host in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"):
        assert default.for_uri("https", host) is None, host
    assert default.for_uri("https", "10.0.0.5") is not None
    assert settings(HTTPS_PROXY="http://p:1", NO_PROXY="").for_uri("https", "127.0.0.1") is not None


def test_no_proxy_names_domains_hosts_networks_or_everything():
    chosen = settings(HTTPS_PROXY="http://p:1", no_proxy=".corp.example, registry.local:5000 ,10.0.0.0/8")
    for host in ("corp.example", "harbor.corp.example", "registry.local", "10.1.2.3"):
        assert chosen.for_uri("https", host) is None, host
    for host in ("notcorp.example", "ghcr.io", "11.0.0.1", "127.0.0.1"):
        assert chosen.for_uri("https", host) is not None, host
    assert settings(HTTPS_PROXY="http://p:1", NO_PROXY="*").for_uri("https", "ghcr.io") is None
    starred = settings(HTTPS_PROXY="http://p:1", NO_PROXY="*.corp.example")
    assert starred.for_uri("https", "harbor.corp.example") is None
    assert starred.for_uri("https", "notcorp.example") is not None


def test_no_proxy_takes_ipv6_addresses_bracketed_with_a_port_or_bare():
    # "[fd00::5]:5000", as Go (docker, containerd) takes it, never matched.
    chosen = settings(HTTPS_PROXY="http://p:1", NO_PROXY="[fd00::5]:5000,[::1],fd00:0:0::7")
    for host in ("fd00::5", "[fd00::5]", "::1", "fd00::7"):
        assert chosen.for_uri("https", host) is None, host
    assert chosen.for_uri("https", "fd00::6") is not None


def test_a_proxy_url_from_all_proxy_is_named_as_such():
    with pytest.raises(ValueError) as caught:
        settings(ALL_PROXY="socks5://proxy:1080")
    assert str(caught.value).startswith("ALL_PROXY: only http:// and https:// proxies")

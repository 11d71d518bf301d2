"""Which addresses a registry's redirects and token realm may take cargobay to."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address

from cargobay.reach import LINK_LOCAL, LOOPBACK, PRIVATE, PUBLIC, Reach, kind_of


@pytest.mark.parametrize(
    "host, kind",
    [("8.8.8.8", PUBLIC), ("2606:4700::1111", PUBLIC), ("10.1.2.3", PRIVATE), ("192.168.0.9", PRIVATE),
     ("100.64.0.1", PRIVATE), ("fd00::2", PRIVATE), ("127.0.0.1", LOOPBACK), ("::1", LOOPBACK),
     ("0.0.0.0", LOOPBACK), ("::ffff:127.0.0.1", LOOPBACK), ("169.254.169.254", LINK_LOCAL),
     ("fe80::1%eth0", LINK_LOCAL), ("::ffff:169.254.169.254", LINK_LOCAL)],
)
def test_kinds_of_address(host, kind):
    assert kind_of(host) == kind


def test_a_registry_sends_cargobay_only_as_far_in_as_it_was_reached_itself():
    public, on_prem = Reach(), Reach()
    public.seen(IPv4Address("TCP", "104.18.1.1", 443))
    on_prem.seen(IPv4Address("TCP", "10.0.0.5", 443))
    for address, from_public, from_on_prem in [
        (IPv4Address("TCP", "151.101.2.1", 443), True, True),
        (IPv4Address("TCP", "10.0.0.6", 9000), False, True),
        (IPv4Address("TCP", "127.0.0.1", 6379), False, False),
        (IPv4Address("TCP", "169.254.169.254", 80), False, False),
        (IPv6Address("TCP", "::1", 80), False, False),
    ]:
        assert (public.allows(address), on_prem.allows(address)) == (from_public, from_on_prem), address.host


def test_the_registry_is_known_by_the_address_it_was_reached_at_not_every_one_its_name_has():
    # A name with a public and a loopback address, reached at the public
    # one, counted as reached at loopback: its redirects to 127.0.0.1 went.
    from types import SimpleNamespace

    from twisted.internet.defer import succeed

    from cargobay.reach import _Noting

    class Reached:
        def connect(self, factory):
            peer = IPv4Address("TCP", "104.18.1.1", 443)
            return succeed(SimpleNamespace(transport=SimpleNamespace(getPeer=lambda: peer)))

    reach = Reach()
    _Noting(Reached(), reach).connect(None)
    assert reach.registry_kinds == {PUBLIC}
    assert not reach.allows(IPv4Address("TCP", "127.0.0.1", 80))

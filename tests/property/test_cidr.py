"""CidrSet and parse_ip (policies/access.py) against the `ipaddress` module: /0, /32, /128, range
boundaries, merged and overlapping networks, and IPv4-mapped IPv6 addresses and rules."""
from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastgate.policies.access import CidrSet, format_ip, parse_cidr, parse_ip

MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def v4_net():
    return st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
                     st.integers(0, 2**32 - 1), st.integers(0, 32))


def v6_net():
    # some inside ::ffff:0:0/96 (rules on mapped addresses), the rest anywhere
    return st.one_of(
        st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False), st.integers(0, 2**128 - 1),
                  st.integers(0, 128)),
        st.builds(lambda a, p: ipaddress.IPv6Network(((0xFFFF << 32) | a, p), strict=False),
                  st.integers(0, 2**32 - 1), st.integers(96, 128)))


nets = st.lists(st.one_of(v4_net(), v6_net()), min_size=0, max_size=8)


def canonical(addr):
    """The model's view: an IPv4-mapped IPv6 address is the IPv4 address."""
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def canonical_net(net):
    if net.version == 6 and net.subnet_of(MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def model_contains(networks, addr) -> bool:
    a = canonical(addr)
    return any(a.version == n.version and a in n for n in map(canonical_net, networks))


def candidates(networks, extra):
    """Addresses at and around each network's edges, plus arbitrary ones."""
    out = list(extra)
    for n in networks:
        top = 2**32 - 1 if n.version == 4 else 2**128 - 1
        first, last = int(n.network_address), int(n.broadcast_address)
        for x in (first - 1, first, first + 1, last - 1, last, last + 1):
            if 0 <= x <= top:
                out.append(ipaddress.ip_address(x) if n.version == 4 else ipaddress.IPv6Address(x))
    return out


addresses = st.lists(st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.integers(0, 2**32 - 1).map(lambda a: ipaddress.IPv6Address((0xFFFF << 32) | a))), max_size=6)


@settings(max_examples=500, deadline=None)
@given(nets, addresses)
@example([ipaddress.IPv4Network("0.0.0.0/0")], [ipaddress.IPv6Address("::ffff:1.2.3.4")])
@example([ipaddress.IPv6Network("::/0")], [ipaddress.IPv4Address("1.2.3.4"), ipaddress.IPv6Address("::1")])
@example([ipaddress.IPv4Network("10.0.0.7/32"), ipaddress.IPv6Network("2001:db8::1/128")], [])
@example([ipaddress.IPv6Network("::ffff:0:0/96")], [ipaddress.IPv4Address("255.255.255.255")])
@example([ipaddress.IPv4Network("10.0.0.0/9"), ipaddress.IPv4Network("10.128.0.0/9")], [])
def test_membership_matches_ipaddress(networks, extra):
    s = CidrSet([str(n) for n in networks])
    for addr in candidates(networks, extra):
        parsed = parse_ip(str(addr))
        assert (parsed in s) == model_contains(networks, addr), (networks, addr)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                 st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_parse_and_format_round_trip(addr):
    for text in {str(addr), addr.exploded}:
        fam, n = parse_ip(text)
        c = canonical(addr)
        assert (fam, n) == (c.version, int(c))
        assert ipaddress.ip_address(format_ip((fam, n))) == c


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:.%x /-", max_size=45))
def test_parse_ip_accepts_exactly_what_ipaddress_does(text):
    try:
        want = canonical(ipaddress.ip_address(text.partition("%")[0] if ":" in text else text))
    except ValueError:
        want = None
    got = parse_ip(text)
    assert got == ((want.version, int(want)) if want is not None else None), text


@settings(max_examples=300, deadline=None)
@given(st.one_of(v4_net(), v6_net()))
def test_parse_cidr_is_the_network(net):
    c = canonical_net(net)
    assert parse_cidr(str(net)) == (c.version, int(c.network_address), int(c.broadcast_address))

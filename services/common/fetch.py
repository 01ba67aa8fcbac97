"""The SSRF-safe downloader: every outbound fetch (images and webhooks) goes through here.

Three checks, each on the address that is actually dialled:

- `fetch_image` refuses bad URLs on every hop (scheme, credentials, port) and IP literals that
  are not public, before anything is sent; aiohttp never asks a resolver about IP literals.
- `GuardedResolver` drops every resolved address that is not public. The connector's DNS
  cache is off, so each new connection, on every redirect hop, is checked on a fresh answer:
  DNS rebinding cannot swap in a private address after the check.
- The connector's socket factory refuses, at connect time, any address the first two did not
  approve. It is what protects other users of the session (webhook POSTs) from IP literals.

`IMGPIPE_FETCH_ALLOW` (`FetchAllow`) lets tests and local demos reach named host:port pairs
or networks.

Politeness: `limit_per_host` caps the connections to one origin (`OriginTurns`: fetch_image
takes turns, first come first served, and may refuse to wait longer than it is told), and an
origin that answers 429 or 503 is left alone for as long as its Retry-After asks
(`HostCooldowns`). Both are shared by every fetch on the session.

Every ImageFailure message is written for the merchant who sent the URL: what happened, in
plain words, with the number, limit or status involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from services.common.outcome import ImageFailure, OutcomeCode

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Awaited with how many bytes of body may be held: the Content-Length before the body is
# read, and more before any byte beyond what was reserved is kept.
Reserve = Callable[[int], Awaitable[None]]
RESERVE_STEP = 256 * 1024  # the least a body without Content-Length reserves at a time

USER_AGENT = "imgpipe/0.1"
# Only what imaging decodes, so content negotiation (CDNs) never answers with AVIF or SVG.
ACCEPT = "image/jpeg,image/png,image/webp,image/gif,image/bmp,image/tiff;q=0.9,*/*;q=0.5"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SLOW_DOWN = frozenset({429, 503})  # the statuses whose Retry-After holds back the origin
_DEFAULT_COOLDOWN = 1.0  # seconds, for a 429 or 503 that does not say how long to wait
_IMAGE_SERVER = "the image server"  # how fetch_image's messages name the other side


@dataclass(frozen=True, slots=True)
class FetchLimits:
    connect_timeout: float = 5.0
    total_timeout: float = 30.0  # the whole download, every redirect hop included
    stall_timeout: float = 10.0  # the longest wait for the next byte, so a slow drip ends
    max_bytes: int = 50 * 1024 * 1024
    max_redirects: int = 3
    max_retry_after: float = 60.0  # the longest Retry-After we honour
    allowed_ports: frozenset[int] = frozenset({80, 443, 8080, 8443})


# --- address policy -----------------------------------------------------------------------

_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
    )
)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "2001::/23",  # IETF protocol assignments, including Teredo 2001::/32
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """False for loopback, private, link-local (incl. 169.254.169.254), CGNAT 100.64/10,
    multicast, reserved, documentation, unspecified, and IPv6 ULA, link-local, site-local.

    IPv4 embedded in IPv6: mapped (::ffff:0:0/96), 6to4 (2002::/16) and well-known NAT64
    (64:ff9b::/96, used by IPv6-only clusters) are judged by their embedded IPv4 address.
    Teredo (2001::/32), local-use NAT64 (64:ff9b:1::/48), IPv4-compatible (::/96) and
    everything else outside global unicast 2000::/3 are refused outright.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in network for network in _BLOCKED_V4)
    if address.ipv4_mapped is not None:
        return is_public_address(address.ipv4_mapped)
    if address in _NAT64:
        return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    if address.sixtofour is not None:
        return is_public_address(address.sixtofour)
    if address not in _V6_GLOBAL_UNICAST:
        return False
    return not any(address in network for network in _BLOCKED_V6)


def _parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")


def _normalise_host(host: str) -> str:
    """Lower case, no brackets or trailing dot; IP literals in their canonical form."""
    host = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    address = _parse_address(host)
    return str(_unmapped(address)) if address is not None else host


@dataclass(frozen=True, slots=True)
class FetchAllow:
    """IMGPIPE_FETCH_ALLOW: host:port entries or CIDRs that bypass the address block (tests and
    demos only). A host:port entry also lifts the port rule for that pair; a network lifts it
    for every address inside."""

    host_ports: frozenset[tuple[str, int]] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FetchAllow:
        """Comma-separated "127.0.0.1:8080", "[::1]:9000", "localhost:8080", "10.0.0.0/8".
        Raises ValueError naming the bad entry."""
        host_ports: set[tuple[str, int]] = set()
        networks: list[IPNetwork] = []
        for raw in text.split(","):
            entry = raw.strip()
            if not entry:
                continue
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as exc:
                    raise ValueError(f"{entry!r} is not a CIDR network: {exc}") from None
            else:
                host_ports.add(_parse_host_port(entry))
        return cls(frozenset(host_ports), tuple(networks))

    def allows(self, host: str | None, port: int, address: IPAddress) -> bool:
        """True when `host:port` or `address:port` is listed, or `address` is in a listed
        network. `host` None checks the address only."""
        address = _unmapped(address)
        if host is not None and (_normalise_host(host), port) in self.host_ports:
            return True
        if (str(address), port) in self.host_ports:
            return True
        return any(
            network.version == address.version and address in network for network in self.networks
        )

    def could_allow(self, host: str, port: int) -> bool:
        """Whether some address of `host` might be allowed on `port` (decided before DNS)."""
        if self.networks:
            return True
        name = _normalise_host(host)
        return any(
            listed_port == port and (listed == name or _parse_address(listed) is not None)
            for listed, listed_port in self.host_ports
        )


def _parse_host_port(entry: str) -> tuple[str, int]:
    if entry.startswith("["):
        host_text, bracket, port_text = entry[1:].partition("]:")
        if not bracket or _parse_address(host_text) is None or ":" not in host_text:
            raise ValueError(f"{entry!r} is not [IPv6]:port")
    else:
        host_text, colon, port_text = entry.rpartition(":")
        if not colon or not host_text:
            raise ValueError(f"{entry!r} is not host:port or a CIDR network")
        if ":" in host_text:
            raise ValueError(f"{entry!r}: write IPv6 addresses in brackets, as [::1]:9000")
    host = _normalise_host(host_text)
    if _parse_address(host) is None and not _HOST_NAME.match(host):
        raise ValueError(f"{entry!r}: {host_text!r} is not a host name or IP address")
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


# --- the guard ----------------------------------------------------------------------------


class BlockedConnectError(OSError):
    """Raised by the socket factory instead of dialling an address the guard refuses."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"refusing to connect to {host} port {port}")
        self.host = host
        self.port = port


class GuardedResolver(AbstractResolver):
    """Resolves through an inner resolver (default aiohttp's DefaultResolver), then drops every
    address that is not allowed; raises ImageFailure(BLOCKED_ADDRESS) when nothing is left.

    Allowed: public addresses on a port in `allowed_ports` (None = any port), and whatever
    `allow` lists. Also supplies the connector's socket factory, the connect-time tripwire.
    """

    def __init__(
        self,
        allow: FetchAllow,
        inner: AbstractResolver | None = None,
        *,
        allowed_ports: frozenset[int] | None = None,
    ) -> None:
        self.allow = allow
        self.allowed_ports = allowed_ports
        self._inner = inner
        self._owns_inner = inner is None
        # (address, port) pairs approved only because `allow` lists their host name: the
        # socket factory sees addresses, not names. Bounded by the allow list.
        self._approved_by_name: set[tuple[str, int]] = set()

    def permits(self, host: str | None, port: int, address: IPAddress) -> bool:
        """The policy: may a connection to `address:port`, reached as `host`, be made?"""
        if self.allow.allows(host, port, address):
            return True
        port_ok = self.allowed_ports is None or port in self.allowed_ports
        return port_ok and is_public_address(address)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()
        answers = await self._inner.resolve(host, port, family)
        kept = []
        for answer in answers:
            address = _parse_address(answer["host"])
            if address is None or not self.permits(host, port, address):
                continue
            if not self.permits(None, port, address):
                self._approved_by_name.add((str(_unmapped(address)), port))
            kept.append(answer)
        if not kept:
            log.warning(
                "blocked fetch",
                extra={"host": host, "port": port, "addresses": [a["host"] for a in answers]},
            )
            raise ImageFailure(
                OutcomeCode.BLOCKED_ADDRESS,
                f"{host} (port {port}) leads only to private, internal or otherwise blocked "
                "addresses, so it was not contacted",
            )
        return kept

    async def close(self) -> None:
        if self._inner is not None and self._owns_inner:
            await self._inner.close()

    def socket_factory(self, addr_info: AddrInfoType) -> socket.socket:
        """aiohttp's socket factory: refuse to even create a socket for a refused address."""
        family, type_, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        address = _parse_address(host)
        if address is None or not (
            self.permits(None, port, address)
            or (str(_unmapped(address)), port) in self._approved_by_name
        ):
            log.warning("blocked connect", extra={"address": host, "port": port})
            raise BlockedConnectError(host, port)
        return socket.socket(family=family, type=type_, proto=proto)


OriginKey = tuple[str, str, int]  # scheme, host, port
# Asked when a bounded wait for an origin's connection runs out: True waits another round.
KeepWaiting = Callable[[OriginKey], Awaitable[bool]]


def origin_key(url: str) -> OriginKey | None:
    """The origin a URL's first request goes to; None for a URL that does not parse."""
    try:
        return HostCooldowns.key(URL(url))
    except ValueError:
        return None


class HostCooldowns:
    """Origins that answered 429 or 503, and until when we leave them alone.

    Kept on the session's connector, so one task's answer holds back every other fetch to the
    same origin (scheme, host and port) on that session. `now` is the clock, in seconds
    (time.monotonic; tests inject their own)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self._until: dict[OriginKey, float] = {}

    @staticmethod
    def key(url: URL) -> OriginKey:
        return (url.scheme, _normalise_host(url.raw_host or ""), url.port or 0)

    def remaining(self, url: URL) -> float:
        """Seconds left before `url`'s origin may be asked again; 0.0 when it may now."""
        key = self.key(url)
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self.now()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left

    def hold(self, url: URL, seconds: float) -> None:
        """Leave `url`'s origin alone for `seconds` (never shortening a longer hold)."""
        now = self.now()
        # Forget the holds that are over, so the table only ever holds origins cooling now.
        self._until = {key: until for key, until in self._until.items() if until > now}
        if seconds <= 0:
            return
        key = self.key(url)
        self._until[key] = max(self._until.get(key, now), now + seconds)


class OriginBusy(Exception):
    """Every connection to an origin stayed in use for as long as the fetch agreed to wait for
    one: nothing was sent. `delay` is the origin's recent time per turn (the wait when it has
    none yet): about when a connection should be free again."""

    def __init__(self, origin: OriginKey, waited: float, delay: float) -> None:
        super().__init__(f"{origin[1]}:{origin[2]}: every connection busy for {waited:.1f} s")
        self.origin = origin
        self.waited = waited
        self.delay = delay


@dataclass(slots=True)
class _Origin:
    connections: asyncio.Semaphore
    users: int = 0  # fetches holding or waiting for a connection: the entry goes at 0
    seconds: float | None = None  # recent time per turn, a moving average


class OriginTurns:
    """At most `limit` fetches at a time to one origin (scheme, host and port); the others wait,
    first come, first served. A fetch may bound its wait: then OriginBusy tells it when to come
    back instead of holding it in the queue (a worker gives its task back rather than hold a
    slot while it waits, docs/scheduling.md).

    Memory is bounded by the fetches in progress: an origin nobody uses or waits for is forgotten.
    `now` is the clock (time.monotonic; tests inject their own); `observe`, when given, is
    called with the seconds each fetch waited, for a connection or until it gave up."""

    SMOOTHING = 0.2  # the weight of the newest turn in the moving average

    def __init__(
        self,
        limit: int,
        now: Callable[[], float] = time.monotonic,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.limit = limit
        self.now = now
        self.observe = observe or (lambda seconds: None)
        self._origins: dict[OriginKey, _Origin] = {}

    def __len__(self) -> int:
        """The origins somebody holds or waits for a connection to."""
        return len(self._origins)

    def users(self, url: URL) -> int:
        """The fetches holding or waiting for a connection to `url`'s origin."""
        origin = self._origins.get(HostCooldowns.key(url))
        return 0 if origin is None else origin.users

    @contextlib.asynccontextmanager
    async def turn(
        self, url: URL, *, wait: float | None = None, keep_waiting: KeepWaiting | None = None
    ) -> AsyncIterator[None]:
        """Hold one of the origin's `limit` connections for the body of the block. With `wait`,
        each time that many seconds pass without one, `keep_waiting(origin)` decides: True
        keeps the fetch's place in the queue for another `wait`; False (or no keep_waiting)
        raises OriginBusy. Without `wait`, it waits as long as it takes."""
        key = HostCooldowns.key(url)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(asyncio.Semaphore(self.limit))
        origin.users += 1
        try:
            started = self.now()
            if not await _acquire(origin.connections, wait, lambda: _ask(keep_waiting, key)):
                waited = self.now() - started
                self.observe(waited)
                delay = origin.seconds if origin.seconds is not None else waited
                raise OriginBusy(key, waited, delay)
            began = self.now()
            self.observe(began - started)
            try:
                yield
            finally:
                origin.connections.release()
                took = self.now() - began
                previous = took if origin.seconds is None else origin.seconds
                origin.seconds = previous + self.SMOOTHING * (took - previous)
        finally:
            origin.users -= 1
            if origin.users == 0:
                del self._origins[key]


async def _ask(keep_waiting: KeepWaiting | None, origin: OriginKey) -> bool:
    return keep_waiting is not None and await keep_waiting(origin)


async def _acquire(
    connections: asyncio.Semaphore, wait: float | None, keep_waiting: Callable[[], Awaitable[bool]]
) -> bool:
    """Take a connection, asking `keep_waiting` after each `wait` seconds without one; False
    when it said no. The place in the semaphore's queue is kept throughout."""
    if wait is None:
        await connections.acquire()
        return True
    acquiring = asyncio.ensure_future(connections.acquire())
    taken = False
    try:
        while not (await asyncio.wait({acquiring}, timeout=wait))[0]:
            # A connection that came while keep_waiting was asked is taken all the same.
            if not await keep_waiting() and not acquiring.done():
                return False
        taken = True
        return True
    finally:
        if not taken:
            if acquiring.done() and not acquiring.cancelled():
                connections.release()  # came just as an error or a cancel ended the wait
            else:
                acquiring.cancel()  # asyncio's semaphore hands on a turn it was just given


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector that resolves through `guard`, never caches DNS, and dials only what the
    guard approves. Closing it closes the guard. `cooldowns` holds the origins that asked us
    to slow down; fetch_image takes `turns` for the `limit_per_host` connections to an origin."""

    def __init__(
        self,
        guard: GuardedResolver,
        *,
        limit_per_host: int = 8,
        now: Callable[[], float] = time.monotonic,
        observe_connection_wait: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(
            resolver=guard,
            use_dns_cache=False,
            limit_per_host=limit_per_host,
            socket_factory=guard.socket_factory,
        )
        self.guard = guard
        self.cooldowns = HostCooldowns(now)
        self.turns = OriginTurns(limit_per_host, now, observe_connection_wait)

    async def close(self, *, abort_ssl: bool = False) -> None:
        try:
            await super().close(abort_ssl=abort_ssl)
        finally:
            await self.guard.close()


def make_session(
    allow: FetchAllow,
    limits: FetchLimits,
    *,
    resolver_inner: AbstractResolver | None = None,
    limit_per_host: int = 8,
    now: Callable[[], float] = time.monotonic,
    observe_connection_wait: Callable[[float], None] | None = None,
) -> aiohttp.ClientSession:
    """A ClientSession on a GuardedConnector (no DNS cache, keep-alive, at most
    `limit_per_host` connections to one origin), with the limits' timeouts, no cookies and no
    proxy from the environment. `now` is the clock of the 429/503 cooldowns and the
    connections' turns; `observe_connection_wait` gets each fetch_image hop's wait for a
    connection. Callers own and close it; call from a running event loop."""
    guard = GuardedResolver(allow, resolver_inner, allowed_ports=limits.allowed_ports)
    connector = GuardedConnector(
        guard,
        limit_per_host=limit_per_host,
        now=now,
        observe_connection_wait=observe_connection_wait,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=limits.total_timeout,
            sock_connect=limits.connect_timeout,
            sock_read=limits.stall_timeout,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )


# --- fetching -----------------------------------------------------------------------------


async def fetch_image(
    session: aiohttp.ClientSession,
    url: str,
    limits: FetchLimits,
    *,
    reserve: Reserve | None = None,
    connection_wait: float | None = None,
    keep_waiting: KeepWaiting | None = None,
) -> bytes:
    """GET `url` through `session` (from make_session), following at most
    `limits.max_redirects` redirects, each hop checked like the first, within
    `limits.total_timeout` overall, at most `limits.stall_timeout` without receiving a byte,
    and `limits.max_bytes` of body.

    An origin that answered 429 or 503 is not asked again while its Retry-After lasts (capped
    at `limits.max_retry_after`; 1 s when it gave none): until then the fetch fails at once,
    transient, with `retry_after` set to the time left.

    With `reserve`, a body of known length is reserved (awaited) before it is read, and any
    body is reserved further, in doubling steps of at least RESERVE_STEP, before bytes beyond
    what was reserved are kept (no Content-Length, or gzip that decodes larger): reading
    pauses while the budget is busy, so a worker bounds the input it holds whatever the
    origin sends. The waits do not count against the timeouts.

    Each hop waits its turn for one of the origin's `limit_per_host` connections. With
    `connection_wait`, each time that many seconds pass without one, `keep_waiting(origin)`
    decides whether it keeps its place for another round; when it does not (or there is no
    keep_waiting), the fetch raises OriginBusy, having sent nothing on that hop.

    The port rule uses the session's `allowed_ports` (make_session's limits). Raises
    ImageFailure: HTTP_STATUS, TIMEOUT, CONNECTION, TOO_MANY_REDIRECTS, BLOCKED_ADDRESS (also
    for refused URLs: scheme, credentials, port) or TOO_LARGE. TypeError for a session that
    make_session did not create.
    """
    connector = session.connector
    if not isinstance(connector, GuardedConnector):
        raise TypeError("fetch_image needs a session from make_session()")
    deadline = asyncio.timeout(limits.total_timeout)

    async def reserve_body(length: int) -> None:
        if reserve is None:
            return
        loop = asyncio.get_running_loop()
        started, when = loop.time(), deadline.when()
        deadline.reschedule(None)  # the clock stops while the worker's budget is busy
        try:
            await reserve(length)
        finally:
            if when is not None:
                deadline.reschedule(when + loop.time() - started)

    try:
        async with deadline:
            return await _follow(
                session, connector, url, limits, reserve_body, connection_wait, keep_waiting
            )
    except ImageFailure:
        raise
    except TimeoutError as exc:
        if deadline.expired():
            message = f"the download took longer than {limits.total_timeout:g} s"
            raise ImageFailure(OutcomeCode.TIMEOUT, message, transient=True) from exc
        raise _timeout_failure(exc, _IMAGE_SERVER, limits) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise failure_from_exception(exc, who=_IMAGE_SERVER) from exc


async def _follow(
    session: aiohttp.ClientSession,
    connector: GuardedConnector,
    url: str,
    limits: FetchLimits,
    reserve: Reserve,
    connection_wait: float | None,
    keep_waiting: KeepWaiting | None,
) -> bytes:
    try:
        current = URL(url)
    except (ValueError, TypeError) as exc:
        raise ImageFailure(OutcomeCode.BLOCKED_ADDRESS, f"the URL is not valid: {exc}") from exc
    # fetch_image's own deadline covers the whole download, every hop included. sock_read is
    # the stall limit: aiohttp restarts it whenever a byte arrives, headers or body.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=limits.connect_timeout, sock_read=limits.stall_timeout
    )
    for _ in range(limits.max_redirects + 1):
        _check_url(current, connector.guard)
        async with connector.turns.turn(current, wait=connection_wait, keep_waiting=keep_waiting):
            # After the wait: another fetch's answer may have started a cooldown meanwhile.
            _check_cooldown(current, connector.cooldowns)
            async with session.get(
                current, allow_redirects=False, timeout=timeout, headers={"Accept": ACCEPT}
            ) as response:
                if response.status in _REDIRECTS:
                    current = _redirect_target(response)
                    continue
                if not 200 <= response.status < 300:
                    raise _status_failure(response, current, connector.cooldowns, limits)
                return await _read_body(response, limits, reserve)
    if limits.max_redirects == 0:
        message = "the image server answered with a redirect, and redirects are not followed"
    else:
        message = f"the image server redirected more than {limits.max_redirects} times"
    raise ImageFailure(OutcomeCode.TOO_MANY_REDIRECTS, message)


def check_url(session: aiohttp.ClientSession, url: str | URL) -> URL:
    """Refuse, before anything is resolved or sent, what the session's guard never allows
    (scheme, credentials, port, an IP literal that is not public); returns the parsed URL.

    For requests made with the session directly (webhooks); fetch_image does it on every hop.
    Raises ImageFailure(BLOCKED_ADDRESS), or TypeError for a session not from make_session().
    """
    connector = session.connector
    if not isinstance(connector, GuardedConnector):
        raise TypeError("check_url needs a session from make_session()")
    try:
        parsed = URL(url) if isinstance(url, str) else url
    except (ValueError, TypeError) as exc:
        raise ImageFailure(OutcomeCode.BLOCKED_ADDRESS, f"the URL is not valid: {exc}") from exc
    _check_url(parsed, connector.guard)
    return parsed


def refused_before_dns(url: str, allow: FetchAllow, allowed_ports: frozenset[int]) -> str | None:
    """Why the guard will refuse `url` whatever DNS answers (its scheme, credentials or port,
    an IP literal that is not public), or None when only resolving it can tell.

    For URLs accepted now and fetched later (webhook_url): refusing them up front beats
    accepting them and abandoning every delivery."""
    try:
        _check_url(URL(url), GuardedResolver(allow, allowed_ports=allowed_ports))
    except ImageFailure as failure:
        return failure.message
    except (ValueError, TypeError) as exc:
        return f"the URL is not valid: {exc}"
    return None


def _check_url(url: URL, guard: GuardedResolver) -> None:
    """Refuse what no hop may ask for, before anything is resolved or sent."""
    if url.scheme not in ("http", "https"):
        raise ImageFailure(
            OutcomeCode.BLOCKED_ADDRESS,
            f"only http and https URLs can be downloaded, not the {url.scheme!r} scheme",
        )
    if url.raw_user is not None or url.raw_password is not None:
        raise ImageFailure(
            OutcomeCode.BLOCKED_ADDRESS,
            "URLs with a user name or password (credentials) are not accepted",
        )
    host, port = url.raw_host, url.port
    if not host or port is None:
        raise ImageFailure(OutcomeCode.BLOCKED_ADDRESS, "the URL has no host name")
    address = _parse_address(host)
    if address is not None:
        if guard.permits(host, port, address):
            return
        if is_public_address(address):  # then it is the port that is refused
            raise ImageFailure(OutcomeCode.BLOCKED_ADDRESS, _port_refused(port, guard))
        raise ImageFailure(
            OutcomeCode.BLOCKED_ADDRESS,
            f"{host} is a private, internal or reserved address; connections to it are not allowed",
        )
    if host.replace(".", "").isdigit():
        raise ImageFailure(
            OutcomeCode.BLOCKED_ADDRESS,
            f"{host} is not a canonical IPv4 address (four numbers, like 93.184.216.34)",
        )
    port_ok = guard.allowed_ports is None or port in guard.allowed_ports
    if not (port_ok or guard.allow.could_allow(host, port)):
        # Refused before DNS when no allow entry could lift the port rule.
        raise ImageFailure(OutcomeCode.BLOCKED_ADDRESS, _port_refused(port, guard))


def _port_refused(port: int, guard: GuardedResolver) -> str:
    ports = ", ".join(str(p) for p in sorted(guard.allowed_ports or ()))
    return f"port {port} is not allowed; imgpipe connects only to ports {ports}"


def _check_cooldown(url: URL, cooldowns: HostCooldowns) -> None:
    """Refuse, without sending anything, a hop to an origin that asked us to slow down."""
    wait = cooldowns.remaining(url)
    if wait > 0:
        raise ImageFailure(
            OutcomeCode.HTTP_STATUS,
            f"the image server asked us to slow down; retrying in {_whole_seconds(wait)} s",
            transient=True,
            retry_after=wait,
            sent=False,
        )


def _redirect_target(response: aiohttp.ClientResponse) -> URL:
    answer = _answer(response)
    location = response.headers.get(aiohttp.hdrs.LOCATION)
    if not location:
        raise ImageFailure(
            OutcomeCode.HTTP_STATUS,
            f"the image server answered {answer}, a redirect, without saying where to",
        )
    try:
        return response.url.join(URL(location)).with_fragment(None)
    except (ValueError, TypeError) as exc:
        raise ImageFailure(
            OutcomeCode.HTTP_STATUS,
            f"the image server answered {answer}, a redirect to an invalid address",
        ) from exc


def _answer(response: aiohttp.ClientResponse) -> str:
    """ "404 Not Found", or the bare status when the server sent no reason phrase."""
    return f"{response.status} {response.reason}" if response.reason else str(response.status)


def is_transient_status(status: int) -> bool:
    return status in (408, 425, 429) or 500 <= status <= 599


def _status_failure(
    response: aiohttp.ClientResponse, url: URL, cooldowns: HostCooldowns, limits: FetchLimits
) -> ImageFailure:
    transient = is_transient_status(response.status)
    retry_after = parse_retry_after(response.headers.get(aiohttp.hdrs.RETRY_AFTER))
    if retry_after is not None:
        retry_after = min(retry_after, limits.max_retry_after)
    if response.status in _SLOW_DOWN:
        cooldowns.hold(url, _DEFAULT_COOLDOWN if retry_after is None else retry_after)
    message = f"the image server answered {_answer(response)}"
    if transient and retry_after:
        message += f"; it asked us to retry in {_whole_seconds(retry_after)} s"
    return ImageFailure(
        OutcomeCode.HTTP_STATUS, message, transient=transient, retry_after=retry_after
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _read_body(
    response: aiohttp.ClientResponse, limits: FetchLimits, reserve: Reserve
) -> bytes:
    max_bytes = limits.max_bytes
    length = response.content_length
    if length is not None and length > max_bytes:
        response.close()  # drop the connection rather than drain a body we will not read
        raise ImageFailure(
            OutcomeCode.TOO_LARGE,
            f"the image is {_size(length)}; the limit is {_size(max_bytes)}",
        )
    held = length or 0
    if held:
        await reserve(held)
    chunks = []
    received = 0
    try:
        # Counted after content decoding, so a small gzip body cannot inflate past the limit.
        # Whatever has arrived, as it arrived: iter_chunked(n) would copy it into n-byte
        # pieces first, a quarter of a download's CPU (docs/performance.md). aiohttp's flow
        # control bounds what a read can hand over at once.
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if received > max_bytes:
                response.close()
                raise ImageFailure(
                    OutcomeCode.TOO_LARGE,
                    f"the download is larger than the {_size(max_bytes)} limit",
                )
            if received > held:  # no byte is kept beyond what the budget granted
                held = min(max_bytes, max(received, 2 * held, RESERVE_STEP))
                await reserve(held)
            chunks.append(chunk)
    except aiohttp.SocketTimeoutError as exc:
        raise ImageFailure(
            OutcomeCode.TIMEOUT,
            f"the image server stopped sending data for {limits.stall_timeout:g} s",
            transient=True,
        ) from exc
    return b"".join(chunks)


def _size(n: int) -> str:
    """Bytes for people: "1001 bytes", "50 MiB", "50.1 MiB". Rounded up, so a size just over
    a limit never reads as the limit itself."""
    if n < 10 * 1024:
        return f"{n} bytes"
    unit, factor = next(
        (unit, factor)
        for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
        if n >= factor
    )
    return f"{math.ceil(n * 10 / factor) / 10:g} {unit}"


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.append(current.__cause__)
        pending.append(current.__context__)
        if isinstance(current, aiohttp.ClientConnectorError):
            pending.append(current.os_error)


def failure_from_exception(exc: BaseException, *, who: str = "the server") -> ImageFailure:
    """Classify an exception from a guarded session (fetch_image's own mapping; webhook
    delivery uses it too); `who` names the other side in the message. A guard refusal wrapped
    by aiohttp comes out as BLOCKED_ADDRESS."""
    chain = list(_chain(exc))
    for cause in chain:
        if isinstance(cause, ImageFailure):
            return cause
    for cause in chain:
        if isinstance(cause, BlockedConnectError):
            return ImageFailure(
                OutcomeCode.BLOCKED_ADDRESS,
                f"{cause.host} port {cause.port} is a private, internal or otherwise blocked "
                "address, so it was not contacted",
            )
    if isinstance(exc, TimeoutError):
        return _timeout_failure(exc, who, None)
    if isinstance(exc, aiohttp.InvalidURL):
        return ImageFailure(OutcomeCode.BLOCKED_ADDRESS, f"the URL is not valid: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        # Malformed or oversized response headers: the origin is broken, retrying won't help.
        return ImageFailure(
            OutcomeCode.HTTP_STATUS, f"{who} sent an invalid HTTP answer: {exc.message}"
        )
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ImageFailure(OutcomeCode.CONNECTION, _connection_text(exc, who), transient=True)
    return ImageFailure(OutcomeCode.INTERNAL, f"unexpected error: {type(exc).__name__}: {exc}")


def _timeout_failure(exc: TimeoutError, who: str, limits: FetchLimits | None) -> ImageFailure:
    """An aiohttp connect or read timeout; `limits` (when known) puts the numbers in."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        within = f" within {limits.connect_timeout:g} s" if limits else " in time"
        message = f"could not connect to {who}{within}"
    elif isinstance(exc, aiohttp.SocketTimeoutError):
        # fetch_image reports a stall in the body itself; this one came before any answer.
        within = f" within {limits.stall_timeout:g} s" if limits else " in time"
        message = f"{who} did not answer{within}"
    else:
        message = f"{who} did not answer in time"
    return ImageFailure(OutcomeCode.TIMEOUT, message, transient=True)


def _connection_text(exc: BaseException, who: str) -> str:
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"the host name {exc.host} could not be found (DNS)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"the HTTPS certificate of {exc.host} is not valid"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"a secure (HTTPS) connection to {exc.host} could not be set up"
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{who} at {exc.host}:{exc.port}"
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"{where} refused the connection"
        detail = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        return f"could not connect to {where}: {detail}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{who} closed the connection unexpectedly"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"{who} closed the connection before sending the whole answer"
    if isinstance(exc, ConnectionResetError):
        return f"{who} reset the connection"
    return f"the connection to {who} failed: {str(exc) or type(exc).__name__}"

"""Who may come in: the host and origin checks, trusted proxies and client addresses
(sans-I/O), and `Gate`, the admission every route shares (`authorize`, then the rate
limiter).

Internal interface of `tokenhub_stream.asgi` (used by `_proxy.py` and `_resume.py`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ._limits import RateLimiter, UsageLimiter
from ._turn import Turn, maybe_await
from ._wire import ProxyRejection

__all__: list[str] = []


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def is_trusted(host: str | None, networks: tuple[Network, ...]) -> bool:
    if not host or not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalize_origin(scheme: str, netloc: str) -> str:
    scheme = scheme.lower()
    netloc = netloc.lower()
    port = _DEFAULT_PORTS.get(scheme)
    if port and netloc.endswith(":" + port):
        netloc = netloc[: -len(port) - 1]
    return f"{scheme}://{netloc}"


def origin_of(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return normalize_origin(parts.scheme, parts.netloc)


def check_origin(
    headers: Mapping[str, str],
    *,
    own_host: str | None,
    allowed_origins: frozenset[str] | None,
) -> None:
    """Refuse cross-site browser requests (403); requests with neither header pass.

    `text/plain` POSTs need no CORS preflight, so without this check any page could spend the
    owner's tokens through a visitor's logged-in browser.
    """
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise ProxyRejection(403, "Cross-site requests are not allowed.", code="cross_site")
    origin_header = headers.get("origin")
    if origin_header is None:
        return
    origin = origin_of(origin_header)
    if origin is None:
        raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")
    if allowed_origins is not None:
        if "*" in allowed_origins or origin in allowed_origins:
            return
        raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")
    if own_host is None:
        raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")
    # The own host is compared without the scheme: behind a TLS-terminating proxy that is not
    # in `trusted_proxies` the ASGI scheme says http while the page is https. A Host header
    # carries a port only when it is not the default for the scheme the browser used.
    own = own_host.lower()
    if own.endswith((":80", ":443")):
        own = own.rsplit(":", 1)[0]
    if origin.split("://", 1)[1] == own:
        return
    raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")


#: An `allowed_hosts` entry: a name (`example.com`, `127.0.0.1`, `[::1]`), `.suffix` for
#: `*.suffix`, or `*`; and the one port it allows (`None`: any).
HostPattern = tuple[str, int | None]


def split_host(value: str) -> tuple[str, int | None] | None:
    """A `Host` value as `(name, port)`: lowercased, IPv6 in brackets; `None` if malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        try:
            name = f"[{ipaddress.IPv6Address(text[1:end])}]"
        except ValueError:
            return None
        rest = text[end + 1 :]
    else:
        name, colon, port = text.partition(":")
        rest = colon + port
        # `localhost.` is the fully qualified form of the same name.
        name = name[:-1] if name.endswith(".") else name
    if not name:
        return None
    if not rest:
        return name, None
    digits = rest[1:]
    if rest[0] != ":" or not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
        return None
    return name, int(digits)


def parse_allowed_hosts(values: Iterable[str]) -> tuple[HostPattern, ...]:
    """`allowed_hosts` as patterns; raises `ValueError` on an entry that is no host name."""
    if isinstance(values, str):
        raise ValueError("allowed_hosts must be a collection of host names, not one string")
    patterns: list[HostPattern] = []
    for value in values:
        text = value.strip().lower()
        if text == "*":
            patterns.append(("*", None))
            continue
        try:  # a bare IPv6 address, as `--host ::1` gives it
            text = f"[{ipaddress.IPv6Address(text)}]"
        except ValueError:
            pass
        wildcard = text.startswith("*.")
        parsed = split_host(text[2:] if wildcard else text)
        if parsed is None or "*" in parsed[0] or "/" in parsed[0]:
            raise ValueError(f"not a host name for allowed_hosts: {value!r}")
        name, port = parsed
        patterns.append(("." + name if wildcard else name, port))
    return tuple(patterns)


def check_host(value: str | None, patterns: tuple[HostPattern, ...]) -> None:
    """Refuse (400) a request whose host is not one of `patterns`: the DNS-rebinding guard.

    A page on `evil.example` whose name the attacker re-points at the server's address
    reaches it with `Host: evil.example`; the same-origin check alone, which compares
    `Origin` with that very host, would let it through.
    """
    parsed = None if value is None else split_host(value)
    if parsed is not None:
        name, port = parsed
        for pattern, allowed_port in patterns:
            if allowed_port is not None and allowed_port != port:
                continue
            if pattern in ("*", name) or (pattern[0] == "." and name.endswith(pattern)):
                return
    raise ProxyRejection(400, "This host is not allowed.", code="host_not_allowed")


def first_forwarded(value: str | None) -> str | None:
    if not value:
        return None
    first = value.split(",", 1)[0].strip()
    return first or None


def client_address(
    peer: str | None, forwarded_for: str | None, networks: tuple[Network, ...]
) -> str | None:
    """The client address, walking X-Forwarded-For right to left past trusted proxies."""
    if not is_trusted(peer, networks) or not forwarded_for:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


# --- the gate every route passes -------------------------------------------------------------


class GateSettings(Protocol):
    """The proxy's settings the gate reads on every request (they may be reassigned)."""

    authorize: AuthorizeHook | None
    rate_limiter: RateLimiter | None
    allowed_origins: frozenset[str] | None


AuthorizeHook = Callable[[Request], Awaitable[object | None] | object | None]


class Gate:
    """Admission, shared by the chat route and the resume route: the host and origin
    checks, `authorize`, then the rate limiter."""

    __slots__ = ("_hosts", "_settings", "_trusted", "_usage_checked")

    def __init__(
        self,
        settings: GateSettings,
        *,
        allowed_hosts: Collection[str] | None,
        trusted_proxies: Collection[str],
    ) -> None:
        self._settings = settings
        self._hosts = None if allowed_hosts is None else parse_allowed_hosts(allowed_hosts)
        self._trusted = parse_networks(trusted_proxies)
        self._usage_checked: tuple[RateLimiter, UsageLimiter | None] | None = None

    @property
    def checks_hosts(self) -> bool:
        return self._hosts is not None

    def own_host(self, headers: Mapping[str, str], peer: str | None) -> str | None:
        """The host the client asked for; 400 if `allowed_hosts` does not list it.

        `Host`, or from a `trusted_proxies` peer its `X-Forwarded-Host`: the value the
        same-origin check compares `Origin` with, so the one a rebound name would forge.
        """
        host = headers.get("host")
        if is_trusted(peer, self._trusted):
            host = first_forwarded(headers.get("x-forwarded-host")) or host
        if self._hosts is not None:
            check_host(host, self._hosts)
        return host

    def check_origin(self, headers: Mapping[str, str], own_host: str | None) -> None:
        """403 for a cross-site request (see `check_origin`)."""
        check_origin(headers, own_host=own_host, allowed_origins=self._settings.allowed_origins)

    def client_key(self, principal: object, peer: str | None, headers: Mapping[str, str]) -> str:
        """`principal:<principal>`, else `address:<client ip>`: rate-limit key, stream owner."""
        if principal is not None:
            return f"principal:{principal}"
        address = client_address(peer, headers.get("x-forwarded-for"), self._trusted)
        return f"address:{address or 'unknown'}"

    async def authorize(self, request: Request) -> object:
        """The principal `authorize` returned (None without a hook); 401 for None."""
        hook = self._settings.authorize
        if hook is None:
            return None
        try:
            principal = await maybe_await(hook(request))
        except HTTPException as exc:
            headers = dict(exc.headers or {})
            raise ProxyRejection(exc.status_code, str(exc.detail), headers=headers) from None
        if principal is None:
            raise ProxyRejection(401, "Not authorized.", code="unauthorized")
        return principal

    async def admit(
        self, request: Request, turn: Turn, headers: Mapping[str, str], peer: str | None
    ) -> None:
        """`authorize`, then the rate limiter: one admission for chats and resumes alike.

        Sets `turn.principal` and, with a limiter, `turn.limit_key`; raises the rejection.
        """
        turn.principal = await self.authorize(request)
        limiter = self._settings.rate_limiter
        if limiter is None:
            return
        key = turn.limit_key = self.client_key(turn.principal, peer, headers)
        retry_after = await limiter.acquire(key)
        if retry_after is not None:
            seconds = str(max(1, int(retry_after + 0.999)))
            raise ProxyRejection(
                429,
                "Too many requests: slow down.",
                code="rate_limit_exceeded",
                headers={"retry-after": seconds},
            )

    def usage_limiter(self) -> UsageLimiter | None:
        """The rate limiter if it also counts tokens, else None."""
        # Called on every request: an isinstance() against a runtime-checkable protocol
        # costs microseconds (about 2% of the proxy's CPU at 500 streams), so the answer is
        # kept for the limiter it was computed for (`rate_limiter` may be reassigned).
        limiter = self._settings.rate_limiter
        if limiter is None:
            return None
        checked = self._usage_checked
        if checked is None or checked[0] is not limiter:
            usage = limiter if isinstance(limiter, UsageLimiter) else None
            checked = self._usage_checked = (limiter, usage)
        return checked[1]

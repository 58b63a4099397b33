"""Where a service is served and reached: ``unix:PATH``, ``tcp:HOST:PORT``, ``tls:HOST:PORT``.

The spelling follows Cap'n Proto's own addresses (``EzRpcServer``, ``capnp`` tools) with a
scheme in front, so that one string says both where and how: ``unix:`` meets over the bus
(a local kernel), ``tcp:`` and ``tls:`` speak the standard Cap'n Proto RPC protocol.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnixAddress:
    """A unix socket path: programs meet over the bus (capbus/serving.py)."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class TcpAddress:
    """A host and port: standard Cap'n Proto RPC over TCP (with ``tls``, over TLS)."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self.tls else 'tcp'}:{host}:{self.port}"


Address = UnixAddress | TcpAddress

SCHEMES = ("unix", "tcp", "tls")


def parse(address: str | Address) -> Address:
    """``address`` as one of the address classes; ValueError, saying what is wrong, for
    anything else (an IPv6 host in brackets: ``tcp:[::1]:8000``)."""
    if isinstance(address, UnixAddress | TcpAddress):
        return address
    scheme, colon, rest = str(address).partition(":")
    if not colon or scheme not in SCHEMES:
        raise ValueError(f"{address!r} is not an address: write unix:PATH, tcp:HOST:PORT or tls:HOST:PORT")
    if scheme == "unix":
        if not rest or "\0" in rest:
            raise ValueError(f"{address!r}: unix: takes a socket path (unix:/run/user/1000/calc)")
        return UnixAddress(rest)
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"{address!r}: an IPv6 host goes in brackets, then :PORT ({scheme}:[::1]:8000)")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"{address!r}: {scheme}: takes HOST:PORT ({scheme}:localhost:8000)")
    if not host:
        example = f"{scheme}:localhost:8000, or {scheme}:0.0.0.0:8000 to serve on all"
        raise ValueError(f"{address!r}: no host ({example})")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r}: the port must be a number from 0 to 65535")
    return TcpAddress(host, int(port_text), tls=scheme == "tls")

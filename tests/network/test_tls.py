"""``tls:HOST:PORT``: Cap'n Proto's RPC protocol over TLS (the standard library's ssl through
trio.SSLStream), with a certificate this test makes (trustme): a client that trusts its
authority calls the service; one that does not, or that names another host, is refused
with a clear error, and the service serves on."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import capbus
from capbus.addresses import TcpAddress

from .certificates import tls_contexts

HERE = Path(__file__).parent
echo: Any = capbus.load(HERE.parent / "serving" / "echo.capnp")
TIMEOUT = 10


class Echo(echo.Echo.Server):  # type: ignore[misc,name-defined]
    def echo(self, text: str) -> str:
        return text


async def test_a_client_trusting_the_authority_calls_over_tls() -> None:
    service_context, client_context = tls_contexts()
    async with capbus.serve(Echo(), "tls:127.0.0.1:0", tls=service_context) as service:
        assert isinstance(service.address, TcpAddress) and service.address.tls
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(str(service.address), echo.Echo, tls=client_context) as remote:
                assert (await remote.echo(text="private")).text == "private"
            # A client that trusts another authority is refused, saying why.
            with pytest.raises(capbus.ServeError, match="TLS: the service's certificate is not trusted"):
                async with capbus.connect(str(service.address), echo.Echo, tls=ssl.create_default_context()):
                    pass
            # Plain TCP to a TLS service: no answer it understands; the service serves on.
            with pytest.raises((capbus.ServeError, capbus.rpc.errors.RpcError)):
                async with capbus.connect(f"tcp:127.0.0.1:{service.address.port}", echo.Echo, timeout=2):
                    pass
            async with capbus.connect(str(service.address), echo.Echo, tls=client_context) as remote:
                assert (await remote.echo(text="still")).text == "still"


async def test_tls_takes_a_context_where_it_needs_one() -> None:
    with pytest.raises(capbus.ServeError, match="takes a server context"):
        async with capbus.serve(Echo(), "tls:127.0.0.1:0"):
            pass
    service_context, _ = tls_contexts()
    with pytest.raises(capbus.ServeError, match="a TLS context given for a tcp: address"):
        async with capbus.serve(Echo(), "tcp:127.0.0.1:0", tls=service_context):
            pass
    with pytest.raises(capbus.ServeError, match="a TLS context given for a unix: address"):
        async with capbus.serve(Echo(), "unix:/nonexistent/echo", tls=service_context):
            pass


async def test_capbus_serve_serves_tls_from_a_certificate_file(tmp_path: Path) -> None:
    """``capbus serve tls:HOST:PORT module:factory --cert FILE``: a program of its own."""
    import sys

    from tests.serving.processes import started

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    pem = tmp_path / "service.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    argv = [
        sys.executable,
        "-m",
        "capbus",
        "serve",
        "tls:127.0.0.1:0",
        "echo_service:Echo",
        "--cert",
        str(pem),
    ]
    async with started(argv) as (_, said):
        address = said.rpartition(" at ")[2]
        assert address.startswith("tls:127.0.0.1:")
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(address, echo.Echo, tls=client_context) as remote:
                assert (await remote.echo(text="from a file")).text == "from a file"

"""TLS contexts the network tests make: a certificate for 127.0.0.1 signed by an authority
made for the test (trustme), and a client that trusts that authority."""

from __future__ import annotations

import ssl

import trustme


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the service's context, with a certificate for 127.0.0.1; a client context trusting
    the authority that signed it)."""
    authority = trustme.CA()
    service = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(service)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return service, client

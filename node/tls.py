"""DICOM TLS (PS3.15 Annex B.9, BCP 195 TLS Secure Transport Connection Profile).

Builds the ``ssl.SSLContext`` objects the Storage SCP and the export SCU use from the
``[tls]`` section. Both sides negotiate TLS 1.2 or newer only, with the AEAD ECDHE/DHE cipher
suites BCP 195 recommends (TLS 1.3 suites are always AEAD). The server verifies client
certificates against ``ca_certificates``: required when ``require_client_certificate`` is
true, otherwise checked if presented. The client always verifies the server's certificate
(against ``ca_certificates``, or the system trust store if none is configured) and its host
name or IP address.

Loading problems (unreadable file, key that does not match its certificate) are reported as
``ConfigError`` against the ``tls.*`` key, like every other configuration mistake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config import Config, TLSConfig
from node.errors import ConfigError, ConfigProblem

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
"""PS3.15 B.9: TLS 1.2 or later; older versions are never negotiated."""

BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)
"""TLS 1.2 cipher suites of BCP 195 (RFC 7525 §4.2); TLS 1.3 suites are set by OpenSSL."""


def server_context(config: Config) -> ssl.SSLContext | None:
    """The SSL context of the Storage SCP, or None when ``[tls] enabled`` is false. The
    listener (``node.listener``) performs each handshake in the connection's own thread,
    bounded by ``[node] idle_timeout_seconds``."""
    tls = config.tls
    if not tls.enabled:
        return None
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, tls, config.source)
    if tls.ca_certificates is not None:
        _load_ca(context, tls.ca_certificates, config.source)
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: Config) -> ssl.SSLContext:
    """The SSL context for outgoing associations to destinations with ``tls = true``.

    The node's own certificate is presented when configured (for peers that require client
    certificates); the peer is verified against ``ca_certificates`` or the system store.
    """
    tls = config.tls
    context = _base(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls, config.source)
    if tls.ca_certificates is not None:
        _load_ca(context, tls.ca_certificates, config.source)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def tls_args(config: Config, host: str) -> tuple[ssl.SSLContext, str]:
    """``tls_args`` for ``pynetdicom.AE.associate``: the client context and the name to verify."""
    return client_context(config), host


def _base(protocol: ssl._SSLMethod, kind: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    context = kind(protocol)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def _load_chain(context: ssl.SSLContext, tls: TLSConfig, source: str) -> None:
    assert tls.certificate is not None and tls.private_key is not None  # TLSConfig checks
    try:
        context.load_cert_chain(certfile=tls.certificate, keyfile=tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise _problem(
            source, "tls.certificate", f"cannot load certificate and key: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: Path, source: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise _problem(
            source, "tls.ca_certificates", f"cannot load CA certificates: {exc}"
        ) from exc


def _problem(source: str, key: str, reason: str) -> ConfigError:
    return ConfigError([ConfigProblem(source, key, reason)])

"""DICOM TLS on the Storage SCP: trusted clients associate, untrusted ones are refused."""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import Config, DestinationConfig, NodeSection, TLSConfig
from node.errors import ConfigError, ExportError
from node.export import open_association
from node.queue import Queue
from node.scp import StorageSCP
from node.spool import Spool
from node.tls import client_context, server_context
from tests.ops.pki import Pair, issue, make_ca

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "hospital-ca")
    rogue_ca = make_ca(folder, "rogue-ca")
    return {
        "ca": ca,
        "server": issue(ca, folder, "shadowspot"),
        "client": issue(ca, folder, "modality"),
        "rogue": issue(rogue_ca, folder, "rogue-modality"),
    }


def _config(pki: dict[str, Pair], tmp_path: Path, *, require_client: bool = True) -> Config:
    return Config(
        node=NodeSection(port=0, storage=tmp_path / "var"),
        tls=TLSConfig(
            enabled=True,
            certificate=pki["server"].certificate,
            private_key=pki["server"].private_key,
            ca_certificates=pki["ca"].certificate,
            require_client_certificate=require_client,
        ),
    )


@pytest.fixture
def scp(pki: dict[str, Pair], tmp_path: Path) -> Iterator[int]:
    """The node's own Storage SCP with DICOM TLS on, requiring client certificates; its port."""
    config = _config(pki, tmp_path)
    queue = Queue(config.node.storage, study_quiet_seconds=60.0)
    node = StorageSCP(config, spool=Spool(config.node.storage, min_free_bytes=0), queue=queue)
    _, port = node.start()
    try:
        yield port
    finally:
        node.stop(grace_seconds=1.0)
        queue.close()


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    """True when an association (and a C-ECHO over it) succeeds."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    tls_args = (context, "127.0.0.1") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="SHADOWSPOT", tls_args=tls_args)
    if not assoc.is_established:
        # pynetdicom's shutdown() raises on a socket the peer already closed and skips close()
        transport = assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.close()
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def _client(pki: dict[str, Pair], tmp_path: Path, who: str | None) -> ssl.SSLContext:
    """The node's own client context, presenting ``who``'s certificate (or none)."""
    base = _config(pki, tmp_path)
    pair = pki[who] if who else None
    tls = TLSConfig(
        enabled=pair is not None,
        certificate=pair.certificate if pair else None,
        private_key=pair.private_key if pair else None,
        ca_certificates=pki["ca"].certificate,
    )
    return client_context(Config(node=base.node, tls=tls))


def test_trusted_client_certificate_associates(
    scp: int, pki: dict[str, Pair], tmp_path: Path
) -> None:
    """A client whose certificate the hospital CA signed associates and gets C-ECHO success."""
    assert _echo(scp, _client(pki, tmp_path, "client"))


def test_untrusted_client_certificate_is_refused(
    scp: int, pki: dict[str, Pair], tmp_path: Path
) -> None:
    """A client certificate from another CA fails the handshake: no association."""
    assert not _echo(scp, _client(pki, tmp_path, "rogue"))


def test_client_without_certificate_is_refused(
    scp: int, pki: dict[str, Pair], tmp_path: Path
) -> None:
    """With require_client_certificate, a client presenting no certificate is refused."""
    assert not _echo(scp, _client(pki, tmp_path, None))


def test_plain_tcp_client_is_refused(scp: int) -> None:
    """A client speaking plain DICOM (no TLS) to the TLS port does not get an association."""
    assert not _echo(scp, None)


def test_tls_1_1_client_is_refused(scp: int, pki: dict[str, Pair], tmp_path: Path) -> None:
    """The DICOM TLS profile needs TLS 1.2 or newer: a TLS 1.1-only client is refused."""
    context = _client(pki, tmp_path, "client")
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pytest.skip("this OpenSSL build cannot offer TLS 1.1 at all")
    assert not _echo(scp, context)


def test_client_refuses_server_with_untrusted_certificate(
    pki: dict[str, Pair], tmp_path: Path
) -> None:
    """Export side: the node does not associate with a peer whose certificate it cannot verify."""
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    rogue = Config(
        node=NodeSection(port=0, storage=tmp_path / "var"),
        tls=TLSConfig(
            enabled=True,
            certificate=pki["rogue"].certificate,
            private_key=pki["rogue"].private_key,
        ),
    )
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context(rogue))
    try:
        assert not _echo(server.server_address[1], _client(pki, tmp_path, "client"))
    finally:
        server.shutdown()


def test_server_context_is_tls_1_2_or_newer(pki: dict[str, Pair], tmp_path: Path) -> None:
    """Both contexts refuse to negotiate anything older than TLS 1.2, and the SCP demands certs."""
    server = server_context(_config(pki, tmp_path))
    assert server is not None
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert _client(pki, tmp_path, "client").minimum_version == ssl.TLSVersion.TLSv1_2
    optional = server_context(_config(pki, tmp_path, require_client=False))
    assert optional is not None and optional.verify_mode == ssl.CERT_OPTIONAL
    assert server_context(Config()) is None


def test_key_not_matching_certificate_is_a_config_error(
    pki: dict[str, Pair], tmp_path: Path
) -> None:
    """A private key that belongs to another certificate is reported against tls.certificate."""
    config = Config(
        node=NodeSection(port=0, storage=tmp_path / "var"),
        tls=TLSConfig(
            enabled=True,
            certificate=pki["server"].certificate,
            private_key=pki["client"].private_key,
        ),
    )
    with pytest.raises(ConfigError) as caught:
        server_context(config)
    assert caught.value.problems[0].key == "tls.certificate"


@pytest.mark.parametrize("server_pair", ["server", "rogue"])
def test_export_association_over_tls(
    pki: dict[str, Pair], tmp_path: Path, server_pair: str
) -> None:
    """The exporter's open_association reaches a TLS destination whose certificate the
    hospital CA signed, and refuses (retryable ExportError) one signed by another CA."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    peer = Config(
        node=NodeSection(port=0, storage=tmp_path / "peer"),
        tls=TLSConfig(
            enabled=True,
            certificate=pki[server_pair].certificate,
            private_key=pki[server_pair].private_key,
            ca_certificates=pki["ca"].certificate,
            require_client_certificate=True,
        ),
    )
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context(peer))
    port = server.server_address[1]
    base = _config(pki, tmp_path)
    destination = DestinationConfig(
        name="PACS", ae_title="PACS", host="127.0.0.1", port=port, tls=True, timeout_seconds=5
    )
    node = Config(
        node=base.node,
        destinations=(destination,),
        tls=TLSConfig(
            enabled=True,
            certificate=pki["client"].certificate,
            private_key=pki["client"].private_key,
            ca_certificates=pki["ca"].certificate,
        ),
    )
    try:
        if server_pair == "server":
            assoc = open_association(node, destination, [(Verification, ExplicitVRLittleEndian)])
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        else:
            with pytest.raises(ExportError) as caught:
                open_association(node, destination, [(Verification, ExplicitVRLittleEndian)])
            assert caught.value.retryable
    finally:
        server.shutdown()


def test_silent_sockets_do_not_block_a_tls_node(
    scp: int, pki: dict[str, Pair], tmp_path: Path
) -> None:
    """200 TCP connections that never send a ClientHello: a trusted client still associates,
    at once (the handshake runs in each connection's own thread, not the accept thread)."""
    silent = [socket.create_connection(("127.0.0.1", scp), timeout=5) for _ in range(200)]
    try:
        started = time.monotonic()
        assert _echo(scp, _client(pki, tmp_path, "client"))
        assert time.monotonic() - started < 5
    finally:
        for s in silent:
            s.close()

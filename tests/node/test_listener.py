"""The listener's limits on real sockets: silent connections hold neither the port nor a slot,
a slot is freed when its peer closes, one address cannot take every slot, and PDUs and
datasets past the limits are aborted as they arrive."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import uid
from pynetdicom.association import Association

from node.dimse import VERIFICATION_SOP_CLASS
from node.errors import ListenError
from tests.node.conftest import NODE_AE, StartNode, make_config, make_image, scu, with_node

pytestmark = pytest.mark.network
CR = uid.ComputedRadiographyImageStorage


@contextmanager
def silent_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to the node that never send a byte."""
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def _echo_ok(port: int) -> bool:
    assoc = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_200_silent_sockets_do_not_stop_a_listed_modality(start_node: StartNode) -> None:
    node = start_node(max_associations=4)
    with silent_sockets(node.port, 200):
        time.sleep(0.3)
        started = time.monotonic()
        assoc = scu(CR).associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established, "a modality was shut out by silent sockets"
        assert assoc.send_c_store(make_image()).Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < 5


def test_silent_sockets_do_not_count_against_max_associations(start_node: StartNode) -> None:
    node = start_node(max_associations=2)
    with silent_sockets(node.port, 5):
        first = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
        second = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert first.is_established and second.is_established
        first.release()
        second.release()


def _raw_socket(assoc: Association) -> socket.socket:
    """The TCP socket under an established pynetdicom association."""
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    return transport.socket


def test_a_silent_socket_is_closed_after_the_idle_timeout(start_node: StartNode) -> None:
    node = start_node(idle_timeout_seconds=1.0)
    with silent_sockets(node.port, 1) as (sock,):
        started = time.monotonic()
        assert _closed_by_peer(sock, within=5.0)
        assert 0.8 < time.monotonic() - started < 4.0


def test_a_slot_is_free_as_soon_as_its_peer_closes(start_node: StartNode) -> None:
    """A peer that closes after its request: the next association gets the only slot."""
    node = start_node(max_associations=1)
    gone = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert gone.is_established
    raw = _raw_socket(gone)
    raw.shutdown(socket.SHUT_RDWR)
    raw.close()
    deadline = time.monotonic() + 5
    while node.scp.active_associations() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.scp.active_associations() == 0
    assert _echo_ok(node.port)


def test_one_address_cannot_take_every_slot(start_node: StartNode) -> None:
    node = start_node(max_associations=8, max_associations_per_address=2)
    held = [
        scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
        for _ in range(3)
    ]
    rejected = held[2].dul.socket
    if rejected is not None and rejected.socket is not None:
        rejected.socket.close()
    try:
        assert [a.is_established for a in held] == [True, True, False]
        rj = held[2].acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for assoc in held[:2]:
            assoc.release()


def test_a_pdu_over_the_announced_maximum_is_aborted(start_node: StartNode) -> None:
    node = start_node(max_pdu_bytes=65536)
    assoc = scu(CR).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    raw = _raw_socket(assoc)
    length = 1 << 20
    # P-DATA-TF of 1 MiB announced: one PDV (context 1, dataset, last fragment).
    raw.sendall(struct.pack(">BBL", 0x04, 0, length) + struct.pack(">LBB", length - 4, 1, 0x02))
    deadline = time.monotonic() + 5
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    raw.close()


def test_a_dataset_over_max_store_is_aborted_and_not_stored(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node(max_store_mb=0.05)
    big = make_image(rows=256, columns=256)  # 128 KiB of pixels
    assoc = scu(CR).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    raw = _raw_socket(assoc)  # pynetdicom drops it unclosed when the peer resets
    status = assoc.send_c_store(big)
    assert not status or status.Status != 0x0000
    # A-ABORT sent; a peer still sending may see the connection reset before it reads it.
    deadline = time.monotonic() + 5
    while assoc.is_established and not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted or not assoc.is_established
    raw.close()
    assert not list((node.config.node.storage / "spool").rglob("*.dcm"))
    small = scu(CR).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert small.is_established
    assert small.send_c_store(make_image(rows=64, columns=48)).Status == 0x0000
    small.release()


def test_a_port_in_use_is_named(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()
    with pytest.raises(ListenError, match=f"127.0.0.1:{node.port}.*in use"):
        start_node(with_node(make_config(tmp_path / "second"), port=node.port))

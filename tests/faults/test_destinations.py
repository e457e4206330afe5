"""A destination that refuses connections and one that accepts and never answers: intake and
the healthy destination keep working, the broken ones are retried, and the refusing one gets
its results once it comes back."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bench.procs import NodeProcess, StoreSCP
from node.dimse import Status
from tests.faults.conftest import (
    chest_image,
    db_rows,
    echo,
    received_uids,
    send_datasets,
    wait_for,
)
from tests.ports import free_port

pytestmark = pytest.mark.network


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def _deliveries(node: NodeProcess, destination: str) -> list[tuple[str, str, int, str | None]]:
    return [
        (str(s), str(state), int(n), e)
        for s, state, n, e in db_rows(
            node,
            "SELECT sop_instance_uid, state, attempts, last_error FROM deliveries "
            "WHERE destination = ?",
            (destination,),
        )
    ]


def test_broken_destinations_do_not_hold_up_intake_or_others(
    start_node: Callable[..., NodeProcess],
    start_storescp: Callable[..., StoreSCP],
    silent_peer: int,
) -> None:
    """Results for a refusing and a silent destination wait and retry; meanwhile every
    C-STORE succeeds and the healthy PACS gets its results; the refusing one, started later,
    then gets every one of its results exactly once."""
    pacs = start_storescp("pacs", sort_by_study=False)
    down_port = free_port()
    node = start_node(
        node={"study_quiet_seconds": 0.3},
        callers=[
            {"ae_title": "MOD_SILENT", "send_results_to": "SILENT"},
            {"ae_title": "MOD_DOWN", "send_results_to": "DOWN"},
            {"ae_title": "MOD_OK", "send_results_to": "PACS"},
        ],
        destinations=[
            {
                "name": "SILENT",
                "ae_title": "SILENT",
                "host": "127.0.0.1",
                "port": silent_peer,
                "timeout_seconds": 2.0,
            },
            {
                "name": "DOWN",
                "ae_title": "LATER",
                "host": "127.0.0.1",
                "port": down_port,
                "timeout_seconds": 2.0,
            },
            {
                "name": "PACS",
                "ae_title": pacs.ae_title,
                "host": "127.0.0.1",
                "port": pacs.port,
                "timeout_seconds": 5.0,
            },
        ],
        export={"retry_schedule_seconds": [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
    )
    images = {
        ae: [chest_image(rows=160, columns=160, seed=i + 10 * k) for i in range(2)]
        for k, ae in enumerate(("MOD_SILENT", "MOD_DOWN", "MOD_OK"))
    }
    started = time.monotonic()
    for ae in ("MOD_SILENT", "MOD_DOWN", "MOD_OK"):
        statuses = send_datasets(node.port, images[ae], calling_ae=ae)
        assert set(statuses.values()) == {Status.SUCCESS}, (ae, statuses)
    intake_s = time.monotonic() - started

    def pacs_has_everything() -> bool:
        rows = _deliveries(node, "PACS")
        return len(rows) >= len(images["MOD_OK"]) and all(r[1] == "delivered" for r in rows)

    wait_for(pacs_has_everything, 60.0, "the healthy PACS to receive its results")
    expected_pacs = {r[0] for r in _deliveries(node, "PACS")}
    assert set(received_uids(pacs.folder)) == expected_pacs

    def retried() -> bool:
        rows = _deliveries(node, "SILENT") + _deliveries(node, "DOWN")
        return bool(rows) and all(r[2] >= 1 and r[3] for r in rows)

    wait_for(retried, 30.0, "the broken destinations to be attempted and retried")
    for name in ("SILENT", "DOWN"):
        assert all(r[1] != "delivered" for r in _deliveries(node, name))
    # Intake still works while two exporters are failing.
    late = chest_image(rows=160, columns=160, seed=99)
    assert send_datasets(node.port, [late], calling_ae="MOD_OK") == {
        str(late.SOPInstanceUID): Status.SUCCESS
    }
    assert echo(node.port, "MOD_OK") == Status.SUCCESS

    later = start_storescp("later", port=down_port, sort_by_study=False, ae_title="LATER")

    def down_caught_up() -> bool:
        rows = _deliveries(node, "DOWN")
        return bool(rows) and all(r[1] == "delivered" for r in rows)

    wait_for(down_caught_up, 40.0, "the destination that came back to get its results")
    counts = received_uids(later.folder)
    assert set(counts) == {r[0] for r in _deliveries(node, "DOWN")}
    assert all(n == 1 for n in counts.values()), counts
    print(f"intake of 6 images took {intake_s:.2f} s with two broken destinations")

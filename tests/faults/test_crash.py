"""A real ``kill -9`` of ``shadowspot serve`` while studies arrive, and again while results are
being exported to a DCMTK ``storescp``; after each restart every acknowledged instance is
analysed and every result delivered.

Exactly once, precisely: a result the node had marked delivered is never sent again, and
nothing is lost. A C-STORE the node was in the middle of when it died may arrive a second time
(the receiver may have stored it before the node could record the answer; DICOM has no way to
ask); the test allows that only for deliveries that were ``sending`` at the moment of the kill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from pydicom import Dataset

from bench.procs import NodeProcess, StoreSCP
from node.dimse import Status
from tests.faults.conftest import chest_image, db_rows, received_uids, send_datasets, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]

STUDIES = 14


def _send_one_by_one(
    node: NodeProcess, studies: list[Dataset], acknowledged: set[str], stop: threading.Event
) -> None:
    """A modality: one association per study; what is not acknowledged is sent again."""
    pending = list(studies)
    while pending and not stop.is_set():
        ds = pending[0]
        statuses = send_datasets(node.port, [ds], calling_ae="MODALITY1")
        if statuses[str(ds.SOPInstanceUID)] == Status.SUCCESS:
            acknowledged.add(str(ds.SOPInstanceUID))
            pending.pop(0)
        else:
            time.sleep(0.2)  # the node is down: retry, as a modality's queue does


def _states(node: NodeProcess, table: str) -> dict[str, str]:
    return {
        str(u): str(s) for u, s in db_rows(node, f"SELECT sop_instance_uid, state FROM {table}")
    }


def test_kill_9_during_intake_and_during_export(
    start_node: Callable[..., NodeProcess], start_storescp: Callable[..., StoreSCP]
) -> None:
    """Two hard kills (while C-STOREs arrive, then while deliveries are in flight): afterwards
    every acknowledged instance is analysed and every result is at the PACS, none lost, none
    re-sent after it was recorded delivered."""
    pacs = start_storescp("pacs", sort_by_study=False)
    settings = {
        "node": {"study_quiet_seconds": 0.2},
        "callers": [{"ae_title": "MODALITY1", "send_results_to": "PACS"}],
        "destinations": [
            {"name": "PACS", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
        ],
        "export": {"retry_schedule_seconds": [0.5, 1.0, 1.0, 2.0, 2.0, 5.0]},
    }
    node = start_node(**settings)
    studies = [chest_image(rows=192, columns=192, seed=s) for s in range(STUDIES)]
    acknowledged: set[str] = set()
    stop = threading.Event()
    sender = threading.Thread(target=_send_one_by_one, args=(node, studies, acknowledged, stop))
    sender.start()

    # 1. kill -9 while studies arrive.
    wait_for(lambda: len(acknowledged) >= 4, 60.0, "the first acknowledged studies")
    node.kill()
    killed_during_intake = len(acknowledged)
    time.sleep(0.5)  # the modality meets a closed port for a while
    node.start()

    # 2. kill -9 while results are being exported.
    in_flight: set[str] = set()
    delivered_before: set[str] = set()

    def mid_export() -> bool:
        states = _states(node, "deliveries")
        done = {u for u, s in states.items() if s == "delivered"}
        if done and len(done) < len(states):
            delivered_before.update(done)
            in_flight.update(u for u, s in states.items() if s == "sending")
            return True
        return False

    wait_for(mid_export, 90.0, "a moment with some results delivered and some not")
    node.kill()
    time.sleep(0.3)
    node.start()
    sender.join(120)
    assert not sender.is_alive()
    assert len(acknowledged) == STUDIES

    def all_done() -> bool:
        instances = _states(node, "instances")
        deliveries = _states(node, "deliveries")
        analysed = all(instances.get(u) == "analysed" for u in acknowledged)
        return analysed and bool(deliveries) and set(deliveries.values()) == {"delivered"}

    wait_for(all_done, 120.0, "every acknowledged instance analysed and every result delivered")
    expected = set(_states(node, "deliveries"))
    sources = {str(u) for (u,) in db_rows(node, "SELECT source_sop_instance_uid FROM results")}
    assert sources == acknowledged, "a result is missing or belongs to nothing we sent"
    counts = received_uids(pacs.folder)
    assert set(counts) == expected, "lost or unexpected results at the PACS"
    duplicated = {u for u, n in counts.items() if n > 1}
    assert not duplicated & delivered_before, "a result recorded delivered was sent again"
    assert duplicated <= in_flight, f"duplicates beyond the kill's in-flight C-STOREs: {duplicated}"
    stop.set()
    print(
        f"kill -9 twice; {killed_during_intake} studies acknowledged before the first kill, "
        f"{len(acknowledged)} in all, {len(expected)} results delivered, "
        f"{len(delivered_before)} delivered before the second kill, {len(in_flight)} in flight, "
        f"{len(duplicated)} received twice, 0 lost"
    )

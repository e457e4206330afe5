"""The outbound queue on both backends: result UIDs are made once, an object is queued once
per destination and re-armed, claiming is atomic, failures follow the retry schedule, retry
re-arms the dead, and two exporters claiming at once never get the same row."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.deliveries import DeliveryState, NewDelivery
from node.store.database import Database, Schema, open_database
from node.store.deliveries import DeliveryTables

STUDY = "1.2.826.0.1.3680043.10.1234.7"


@pytest.fixture
def database(backend_url: str | None, tmp_path: Path) -> Iterator[Database]:
    """The database of each backend, upgraded to head."""
    opened = open_database(backend_url, storage=tmp_path / "storage", schema=Schema.UPGRADE)
    yield opened
    opened.close()


def _item(n: int, kind: str = "seg") -> NewDelivery:
    return NewDelivery(
        study_instance_uid=STUDY,
        sop_instance_uid=f"{STUDY}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        kind=kind,
        path=Path(f"/results/{n}.dcm"),
    )


def test_result_uids_are_made_once(database: Database) -> None:
    """The second ask for a source instance's result UIDs gets the first answer."""
    store = DeliveryTables(database, retry_schedule_seconds=())
    first = store.result_uids(f"{STUDY}.1", STUDY)
    assert store.result_uids(f"{STUDY}.1", STUDY) == first
    assert store.result_uids(f"{STUDY}.2", STUDY) != first


def test_enqueue_claim_fail_retry(database: Database) -> None:
    """An object is queued once per destination; a failure waits the schedule's first step,
    the last one (or a permanent one) is dead; retry re-arms it; a delivered one is never
    re-armed by enqueue."""
    store = DeliveryTables(database, retry_schedule_seconds=(30.0,))
    first, second = store.enqueue("PACS", [_item(1), _item(2, "sr")])
    assert store.enqueue("PACS", [_item(1)]) == [first]
    assert [d.id for d in store.claim_due("PACS")] == [first, second]
    assert store.claim_due("PACS") == []
    store.mark_delivered(first)
    assert store.mark_failed(second, "refused", retryable=True) is DeliveryState.PENDING
    due = store.next_due("PACS")
    assert due is not None
    assert store.claim_due("PACS", now=due - 1) == []
    assert [d.id for d in store.claim_due("PACS", now=due)] == [second]
    assert store.mark_failed(second, "refused", retryable=True) is DeliveryState.DEAD
    store.enqueue("PACS", [_item(1)])
    assert store.counts() == {DeliveryState.DELIVERED: 1, DeliveryState.DEAD: 1}
    assert store.retry() == [second]
    (again,) = store.deliveries(state=DeliveryState.PENDING)
    assert again.id == second and again.attempts == 0 and again.last_error == "refused"


def test_two_exporters_never_claim_the_same_row(database: Database) -> None:
    """Claims from two threads at once, while rows keep coming: each row is sent once."""
    store = DeliveryTables(database, retry_schedule_seconds=())
    ids = store.enqueue("PACS", [_item(n) for n in range(60)])
    got: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def claim(slot: int) -> None:
        start.wait()
        for _ in range(20):
            got[slot] += [d.id for d in store.claim_due("PACS")]

    threads = [threading.Thread(target=claim, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = got[0] + got[1]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(ids)

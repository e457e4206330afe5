"""The study queue on both backends: what ``tests/node/test_queue.py`` pins on SQLite (a
representative set) holds on PostgreSQL too; two claimers never take the same job; a job
whose lease expired is claimed again by another claimer with its instances; a heartbeat
keeps the lease; ``serve`` refuses a PostgreSQL database ``shadowspot migrate`` has not
upgraded."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.cli import main
from node.config import DatabaseConfig
from node.errors import SchemaError
from node.queue import Abandoned, InstanceState, JobState
from node.serve import Node
from node.store.database import Database, Schema, open_database
from node.store.jobs import JobStore
from node.store.migrate import head
from node.worker import Heartbeat
from tests.node.conftest import make_config
from tests.node.test_queue import T0, _add

MakeStore = Callable[..., JobStore]


@pytest.fixture
def database(backend_url: str | None, tmp_path: Path) -> Iterator[Database]:
    """The database of each backend, upgraded to head."""
    opened = open_database(backend_url, storage=tmp_path / "storage", schema=Schema.UPGRADE)
    yield opened
    opened.close()


@pytest.fixture
def make_store(database: Database) -> MakeStore:
    """Job stores on that database, each its own lease owner (as two workers or nodes)."""

    def make(**options: float) -> JobStore:
        options.setdefault("study_quiet_seconds", 1.0)
        return JobStore(database, **options)  # type: ignore[arg-type]

    return make


def test_grouping_claim_and_finish(make_store: MakeStore) -> None:
    """Quiet studies become one job each, a duplicate is refused, claim leases the oldest
    job, a finished job cannot be finished again."""
    store = make_store(study_quiet_seconds=2.0)
    assert _add(store, "A", 1) and _add(store, "A", 2, T0 + 1.5) and _add(store, "B", 1)
    assert not _add(store, "A", 1)
    assert [j.study_instance_uid for j in store.form_jobs(now=T0 + 2.5)] == ["1.2.3.B"]
    (job_a,) = store.form_jobs(now=T0 + 3.5)
    assert [i.sop_instance_uid for i in store.instances_of(job_a.id)] == ["1.2.3.A.1", "1.2.3.A.2"]
    first = store.claim()
    assert first is not None and first.study_instance_uid == "1.2.3.B" and first.attempts == 1
    owner, expires = store.holder(first.id)
    assert owner == store.owner and expires is not None and expires > time.time()
    store.finish_job(first.id, JobState.DONE, "1 analysed")
    assert store.holder(first.id) == (None, None)
    with pytest.raises(ValueError, match="not running"):
        store.finish_job(first.id, JobState.DONE)
    assert store.job_counts()[JobState.DONE] == 1 and store.pending_instances() == 0


def test_failed_and_interrupted_jobs_fail_their_instances(make_store: MakeStore) -> None:
    """An interrupted job is queued again, at its last attempt failed with its unfinished
    instances; a failed job's finished instances keep their state."""
    store = make_store(max_attempts=2)
    _add(store, "A", 1)
    _add(store, "A", 2)
    store.form_jobs(now=T0 + 5)
    job = store.claim()
    assert job is not None
    store.finish_instance("1.2.3.A.1", InstanceState.ANALYSED, None)
    assert store.interrupted(job.id, "raised") is JobState.QUEUED
    assert store.claim() is not None
    assert store.interrupted(job.id, "raised") is JobState.FAILED
    states = {i.sop_instance_uid: (i.state, i.reason) for i in store.instances()}
    assert states == {
        "1.2.3.A.1": (InstanceState.ANALYSED, None),
        "1.2.3.A.2": (InstanceState.FAILED, "job failed: raised; gave up after 2 attempts"),
    }


def test_abandoned_instances_are_requeued_into_a_new_job(make_store: MakeStore) -> None:
    """A failed instance is abandoned; requeue takes it into a new job with full attempts,
    and its old job, holding only analysed ones now, ends done."""
    store = make_store()
    _add(store, "A", 1)
    _add(store, "A", 2)
    (formed,) = store.form_jobs(now=T0 + 5)
    assert store.claim() is not None
    store.finish_instance("1.2.3.A.1", InstanceState.ANALYSED, None)
    store.finish_instance("1.2.3.A.2", InstanceState.FAILED, "decode")
    store.finish_job(formed.id, JobState.FAILED, "1 failed")
    (abandoned,) = store.abandoned()
    assert abandoned.kind is Abandoned.FAILED and abandoned.job_state is JobState.FAILED
    assert [a.instance.sop_instance_uid for a in store.requeue(["1.2.3.A.2"])] == ["1.2.3.A.2"]
    assert {j.id: j.state for j in store.jobs()} == {formed.id: JobState.DONE}
    (again,) = store.form_jobs(now=T0 + 6)
    assert again.attempts == 0 and [i.sop_instance_uid for i in store.instances_of(again.id)] == [
        "1.2.3.A.2"
    ]


def test_two_claimers_never_get_the_same_job(make_store: MakeStore) -> None:
    """Two stores (two workers) claiming at once from two threads: every job is claimed
    exactly once, each leased to the one that got it."""
    setup = make_store()
    for n in range(40):
        _add(setup, f"S{n}", 1)
    assert len(setup.form_jobs(now=T0 + 5)) == 40
    claimers = [make_store(), make_store()]
    got: dict[str, list[int]] = {c.owner: [] for c in claimers}
    start = threading.Barrier(len(claimers))

    def claim_all(store: JobStore) -> None:
        start.wait()
        while (job := store.claim()) is not None:
            got[store.owner].append(job.id)

    threads = [threading.Thread(target=claim_all, args=(c,)) for c in claimers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [job_id for ids in got.values() for job_id in ids]
    assert sorted(claimed) == sorted(j.id for j in setup.jobs())
    assert len(set(claimed)) == len(claimed) == 40
    for store in claimers:
        assert all(store.holder(job_id)[0] == store.owner for job_id in got[store.owner])


def test_an_expired_lease_goes_to_another_claimer_with_its_instances(
    make_store: MakeStore,
) -> None:
    """A claimer that stops renewing (a dead worker): once its lease expired, another
    claimer's claim takes the job (attempt 2), its finished instance kept and the other
    still to do; the first one's heartbeat and finish are refused."""
    dead, alive = make_store(lease_seconds=0.5), make_store(lease_seconds=30.0)
    _add(dead, "A", 1)
    _add(dead, "A", 2)
    dead.form_jobs(now=T0 + 5)
    job = dead.claim()
    assert job is not None
    dead.finish_instance("1.2.3.A.1", InstanceState.ANALYSED, None)
    assert alive.claim() is None  # the lease holds
    time.sleep(0.7)
    taken = alive.claim()
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    assert alive.holder(job.id)[0] == alive.owner
    states = {i.sop_instance_uid: i.state for i in alive.instances_of(job.id)}
    assert states == {"1.2.3.A.1": InstanceState.ANALYSED, "1.2.3.A.2": InstanceState.QUEUED}
    assert dead.heartbeat(job.id) is False
    with pytest.raises(ValueError, match="not running under this lease"):
        dead.finish_job(job.id, JobState.DONE)
    assert dead.interrupted(job.id, "late") is None
    alive.finish_instance("1.2.3.A.2", InstanceState.ANALYSED, None)
    alive.finish_job(job.id, JobState.DONE)
    assert alive.job_counts()[JobState.DONE] == 1


def test_a_heartbeat_keeps_the_lease(make_store: MakeStore) -> None:
    """Renewed more often than it lasts, a lease outlives its length: nobody else claims
    the job, and it is still the holder's."""
    holder, other = make_store(lease_seconds=0.6), make_store()
    _add(holder, "A", 1)
    holder.form_jobs(now=T0 + 5)
    job = holder.claim()
    assert job is not None
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline:
        assert holder.heartbeat(job.id)
        assert other.claim() is None
        time.sleep(0.15)
    assert holder.holder(job.id)[0] == holder.owner
    holder.finish_job(job.id, JobState.DONE)


def test_recover_on_a_shared_database_leaves_live_leases(
    make_store: MakeStore, database: Database
) -> None:
    """At start, a node on PostgreSQL puts back only expired leases (another node's running
    job is left alone); on SQLite, which one node owns, every running job."""
    first = make_store()
    _add(first, "A", 1)
    first.form_jobs(now=T0 + 5)
    assert first.claim() is not None
    expected = (0, 0) if database.shared else (1, 0)
    assert make_store().recover() == expected


@pytest.mark.network
def test_serve_refuses_a_postgresql_database_not_migrated(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL ``serve`` only checks the schema: an empty database is refused with the
    SchemaError saying to run ``shadowspot migrate``; after it, the node opens it."""
    config = make_config(tmp_path / "storage")
    config = dataclasses.replace(config, database=DatabaseConfig(url=postgres_url))
    with pytest.raises(SchemaError, match="shadowspot migrate"):
        Node(config, analyse_file=None)
    file = tmp_path / "shadowspot.toml"
    storage = tmp_path / "storage"
    file.write_text(
        f'[node]\nstorage = "{storage}"\n[database]\nurl = "{postgres_url}"\n', encoding="utf-8"
    )
    assert main(["migrate", "--config", str(file)]) == 0
    assert f"empty → {head()}" in capsys.readouterr().out
    node = Node(config, analyse_file=None)
    try:
        assert node.database.shared and node.queue.job_counts()[JobState.QUEUED] == 0
    finally:
        node.stop()


def test_the_workers_heartbeat_thread_keeps_the_lease_and_notices_its_loss(
    make_store: MakeStore,
) -> None:
    """``node.worker.Heartbeat`` renews while the worker processes (a slow image outlives
    the lease), and sets ``lost`` once the job was taken from it."""
    holder, other = make_store(lease_seconds=0.4), make_store(lease_seconds=0.4)
    _add(holder, "A", 1)
    holder.form_jobs(now=T0 + 5)
    job = holder.claim()
    assert job is not None
    heartbeat = Heartbeat(holder, job.id, interval=0.1)
    heartbeat.start()
    time.sleep(1.0)
    assert other.claim() is None and not heartbeat.lost.is_set()
    heartbeat.stop()
    time.sleep(0.5)
    assert other.claim() is not None  # no heartbeat: expired, taken
    stale = Heartbeat(holder, job.id, interval=0.05)
    stale.start()
    assert stale.lost.wait(5)
    stale.stop()

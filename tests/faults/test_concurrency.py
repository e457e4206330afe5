"""Eight associations at once, each sending 20 images (two studies of ten), and each also
re-sending two images of its neighbour while the neighbour sends them: every success is on disk
and in the queue exactly once, every study in exactly one job."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from pydicom import Dataset, dcmread, uid

from bench.procs import NodeProcess
from node.dimse import Status
from tests.faults.conftest import chest_image, db_rows, echo, send_datasets, wait_for

pytestmark = pytest.mark.network

ASSOCIATIONS = 8
IMAGES = 20
STUDIES_PER_ASSOCIATION = 2


def test_eight_associations_twenty_images_each(start_node: Callable[..., NodeProcess]) -> None:
    """160 distinct images over 8 concurrent associations (plus 16 concurrent duplicates):
    all acknowledged, each stored and queued once, each study one job, no temp files left."""
    # A quiet period well above the gaps between one sender's images on a loaded 2-core machine:
    # what is tested is concurrency and duplicates, not the quiet timing.
    node = start_node(node={"study_quiet_seconds": 5.0, "max_associations": 16})
    batches: list[list[Dataset]] = []
    for a in range(ASSOCIATIONS):
        studies = [uid.generate_uid() for _ in range(STUDIES_PER_ASSOCIATION)]
        batches.append(
            [
                chest_image(
                    rows=96, columns=96, study_uid=studies[i % len(studies)], seed=a * 100 + i
                )
                for i in range(IMAGES)
            ]
        )
    sends = [batch + batches[(a + 1) % ASSOCIATIONS][:2] for a, batch in enumerate(batches)]
    results: list[dict[str, int | None]] = [{} for _ in sends]
    barrier = threading.Barrier(ASSOCIATIONS)

    def sender(a: int) -> None:
        barrier.wait(10)
        results[a] = send_datasets(node.port, sends[a], calling_ae=f"MOD{a}")

    threads = [threading.Thread(target=sender, args=(a,)) for a in range(ASSOCIATIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    acknowledged = {u for r in results for u, s in r.items() if s == Status.SUCCESS}
    sent = {str(ds.SOPInstanceUID) for batch in batches for ds in batch}
    assert sum(len(r) for r in results) == ASSOCIATIONS * (IMAGES + 2)
    assert acknowledged == sent, f"not acknowledged: {len(sent - acknowledged)}"

    rows = db_rows(node, "SELECT sop_instance_uid, study_instance_uid, path FROM instances")
    assert len(rows) == len(sent) == len({r[0] for r in rows})
    assert {r[0] for r in rows} == sent
    for sop, _, path in rows:
        assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) == sop
    spooled = [p for p in (node.storage / "spool").rglob("*.dcm") if ".tmp" not in p.parts]
    assert len(spooled) == len(sent)
    assert not list((node.storage / "spool" / ".tmp").glob("*")), "temp files left behind"

    studies = {r[1] for r in rows}
    assert len(studies) == ASSOCIATIONS * STUDIES_PER_ASSOCIATION

    def every_study_in_a_job() -> bool:
        return not db_rows(node, "SELECT 1 FROM instances WHERE job_id IS NULL")

    wait_for(every_study_in_a_job, 30.0, "every study to be grouped into a job")
    jobs = db_rows(node, "SELECT study_instance_uid, COUNT(*) FROM jobs GROUP BY 1")
    assert {s for s, _ in jobs} == studies
    twice = [s for s, n in jobs if n != 1]
    detail = db_rows(node, "SELECT study_instance_uid, state, reason FROM jobs ORDER BY id")
    assert not twice, f"a study was queued twice: {[d for d in detail if d[0] in twice]}"
    assert node.alive() and echo(node.port) == Status.SUCCESS
    print(f"associations: {ASSOCIATIONS}, C-STOREs: {sum(len(r) for r in results)}, lost: 0")

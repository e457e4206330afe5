"""Associations the node must refuse: an unknown calling AE, a known one from the wrong
address, and a wrong called AE title. Each is rejected with the proper A-ASSOCIATE-RJ reason,
logged, and nothing is stored."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
from pydicom import uid

from bench.procs import NODE_AE, NodeProcess
from node.dimse import RejectReason, RejectResult, RejectSource, Status
from tests.faults.conftest import (
    chest_image,
    db_rows,
    echo,
    events,
    needs_dcmtk,
    scu,
    send_datasets,
)

pytestmark = pytest.mark.network

CASES = [
    # (calling AE, called AE, source address, expected reason)
    ("INTRUDER", NODE_AE, "127.0.0.1", RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED),
    ("MODALITY1", NODE_AE, "127.0.0.2", RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED),
    ("MODALITY1", "NOTSHADOWSPOT", "127.0.0.1", RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED),
]


def test_unknown_callers_and_wrong_called_ae_are_rejected(
    start_node: Callable[..., NodeProcess],
) -> None:
    """pynetdicom and DCMTK storescu, refused at association: right reason, logged, nothing
    stored; the listed caller from its own address still gets through."""
    needs_dcmtk()
    node = start_node(
        node={"study_quiet_seconds": 0.3},
        callers=[{"ae_title": "MODALITY1", "host": "127.0.0.1"}],
    )
    for calling, called, address, reason in CASES:
        ae = scu(calling)
        ae.add_requested_context(uid.ComputedRadiographyImageStorage, [uid.ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called, bind_address=(address, 0))
        assert assoc.is_rejected, (calling, called, address)
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (
            RejectResult.REJECTED_PERMANENT,
            RejectSource.SERVICE_USER,
            reason,
        )
    image = chest_image()
    image.save_as(node.workdir / "one.dcm", enforce_file_format=True)
    done = subprocess.run(
        ["storescu", "-aet", "INTRUDER", "-aec", NODE_AE, "127.0.0.1", str(node.port), "one.dcm"],
        cwd=node.workdir,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert b"Association Rejected" in done.stderr or b"rejected" in done.stderr.lower()

    rejected = events(node, "association_rejected")
    assert len(rejected) == len(CASES) + 1
    assert {e["reason"] for e in rejected} == {
        "calling_ae_title_not_recognized",
        "calling_address_not_allowed",
        "called_ae_title_not_recognized",
    }
    assert db_rows(node, "SELECT 1 FROM instances") == []
    assert not [p for p in node.storage.rglob("*.dcm")], "something was stored"
    # The listed caller is still served.
    assert send_datasets(node.port, [image]) == {str(image.SOPInstanceUID): Status.SUCCESS}
    assert echo(node.port) == Status.SUCCESS

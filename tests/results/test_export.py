"""Export to a real Orthanc (Debian ``orthanc``, own temporary config, storage in tmp):
objects arrive in the source study and reference the source image; a PACS that is down
delays delivery until it is back; one association per study."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SegmentationStorage,
)

from node.cli import main
from node.config import (
    CallerConfig,
    Config,
    DestinationConfig,
    ExportConfig,
    NodeSection,
    load_config,
)
from node.deliveries import DeliveryState, DeliveryStore
from node.encode import ObjectKind
from node.export import Exporter
from node.results import publish
from tests.ports import free_port
from tests.results.helpers import generated_cr, orthanc, rg1, two_findings, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _config(
    storage: Path, port: int, schedule: tuple[float, ...] = (0.3, 0.3, 0.3, 60.0)
) -> Config:
    return Config(
        node=NodeSection(storage=storage, ae_title="SHADOWSPOT"),
        callers=(CallerConfig(ae_title="MODALITY", send_results_to="pacs"),),
        destinations=(
            DestinationConfig(
                name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port, timeout_seconds=5
            ),
        ),
        export=ExportConfig(retry_schedule_seconds=schedule),
    )


def test_results_arrive_in_orthanc_in_the_source_study(tmp_path: Path) -> None:
    """SEG, SR and GSPS of RG1_UNCI are stored by Orthanc, parse, sit in the source study
    and reference the source image."""
    source = rg1()
    with orthanc(tmp_path / "orthanc") as pacs:
        config = _config(tmp_path / "node", pacs.dicom_port)
        store = DeliveryStore(config.node.storage, retry_schedule_seconds=(0.3,))
        exporter = Exporter(config, store, poll_seconds=0.5)
        exporter.start()
        try:
            published = publish(
                source=source,
                result=two_findings(source),
                config=config,
                store=store,
                calling_ae="MODALITY",
                wake=exporter.wake,
            )
            assert wait_for(lambda: store.counts().get(DeliveryState.DELIVERED) == 3, timeout=60), (
                store.deliveries()
            )
        finally:
            exporter.stop()
        for obj in published.objects:
            orthanc_id = pacs.lookup(obj.sop_instance_uid)
            assert orthanc_id is not None, obj.kind
            ds = pacs.instance(orthanc_id)
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.SOPClassUID == obj.sop_class_uid
            if obj.kind is ObjectKind.SEG:
                ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            elif obj.kind is ObjectKind.SR:
                evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
                ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            else:
                ref = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
                assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        study = pacs.get(f"/instances/{orthanc_id}/study")
        assert study["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
        assert len(study["Series"]) == 3


# pynetdicom 3.0.4 leaks the socket of a refused connection (transport._shutdown_socket: the
# shutdown of an unconnected socket raises and skips close()); the GC closes it later.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pacs_down_then_back_gets_every_object_once(tmp_path: Path) -> None:
    """While Orthanc is stopped deliveries fail and wait; once it is back on the same port
    they arrive, each exactly once."""
    source = generated_cr()
    port = free_port()
    config = _config(tmp_path / "node", port)
    store = DeliveryStore(
        config.node.storage, retry_schedule_seconds=config.export.retry_schedule_seconds
    )
    exporter = Exporter(config, store, poll_seconds=0.3)
    exporter.start()
    try:
        published = publish(
            source=source,
            result=two_findings(source),
            config=config,
            store=store,
            calling_ae="MODALITY",
            wake=exporter.wake,
        )
        assert wait_for(lambda: all(d.attempts >= 1 for d in store.deliveries()), timeout=30)
        failed = store.deliveries()
        assert {d.state for d in failed} <= {DeliveryState.PENDING, DeliveryState.SENDING}
        assert all(d.last_error for d in failed if d.state is DeliveryState.PENDING)
        with orthanc(tmp_path / "orthanc", dicom_port=port) as pacs:
            assert wait_for(lambda: store.counts().get(DeliveryState.DELIVERED) == 3, timeout=60), (
                store.deliveries()
            )
            for obj in published.objects:
                assert pacs.lookup(obj.sop_instance_uid) is not None
            assert len(pacs.get("/instances")) == 3
    finally:
        exporter.stop()


def test_one_association_per_study_with_exactly_the_sent_contexts(tmp_path: Path) -> None:
    """Two images of one study: six objects over one association that proposed only SEG,
    Comprehensive 3D SR and GSPS storage (explicit VR little endian)."""
    associations: list[list[tuple[str, str]]] = []
    stored: list[str] = []

    def on_requested(event: evt.Event) -> None:
        associations.append(
            [
                (c.abstract_syntax, c.transfer_syntax[0])
                for c in event.assoc.requestor.requested_contexts
            ]
        )

    def on_store(event: evt.Event) -> int:
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="PACS")
    for sop in (
        SegmentationStorage,
        Comprehensive3DSRStorage,
        GrayscaleSoftcopyPresentationStateStorage,
    ):
        ae.add_supported_context(sop, "1.2.840.10008.1.2.1")
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)],
    )
    try:
        port = server.server_address[1]
        config = _config(tmp_path / "node", port)
        config = Config(
            node=config.node,
            callers=config.callers,
            export=config.export,
            destinations=(
                DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port),
            ),
        )
        store = DeliveryStore(config.node.storage, retry_schedule_seconds=(1.0,))
        first = generated_cr()
        second = generated_cr()
        second.StudyInstanceUID = first.StudyInstanceUID
        for source in (first, second):
            publish(
                source=source,
                result=two_findings(source),
                config=config,
                store=store,
                calling_ae="MODALITY",
            )
        outcomes = Exporter(config, store).run_once(config.destinations[0])
    finally:
        server.shutdown()
    assert len(outcomes) == 6 and {o.state for o in outcomes} == {DeliveryState.DELIVERED}
    assert len(associations) == 1 and len(stored) == 6
    assert sorted(associations[0]) == sorted(
        {
            (SegmentationStorage, "1.2.840.10008.1.2.1"),
            (Comprehensive3DSRStorage, "1.2.840.10008.1.2.1"),
            (GrayscaleSoftcopyPresentationStateStorage, "1.2.840.10008.1.2.1"),
        }
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see above
def test_dead_letters_are_listed_and_sent_again_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With an empty retry schedule a refused delivery is dead at once; `shadowspot
    deliveries` lists it with its error and `shadowspot retry` sends it once the PACS is up."""
    port = free_port()
    storage = tmp_path / "node"
    config_file = tmp_path / "shadowspot.toml"
    config_file.write_text(
        f"""
[node]
storage = "{storage}"
[[callers]]
ae_title = "MODALITY"
send_results_to = "pacs"
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
timeout_seconds = 5
[export]
retry_schedule_seconds = []
""",
        encoding="utf-8",
    )
    config = load_config(config_file)
    store = DeliveryStore(storage, retry_schedule_seconds=())
    source = generated_cr()
    publish(
        source=source,
        result=two_findings(source),
        config=config,
        store=store,
        calling_ae="MODALITY",
    )
    outcomes = Exporter(config, store).run_once(config.destinations[0])
    assert {o.state for o in outcomes} == {DeliveryState.DEAD}
    assert main(["deliveries", "--config", str(config_file), "--state", "dead"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(" dead ") == 3 and "no association with pacs" in listing
    with orthanc(tmp_path / "orthanc", dicom_port=port) as pacs:
        assert main(["retry", "--config", str(config_file)]) == 0
        assert "pacs: 3 delivered, 0 not delivered" in capsys.readouterr().out
        assert len(pacs.get("/instances")) == 3
    assert store.counts() == {DeliveryState.DELIVERED: 3}

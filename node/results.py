"""Publish the results of one analysed image: encode, store, queue for delivery, alert.

``publish`` is what the worker calls once per analysed source instance::

    published = publish(source=ds, result=result, config=config, store=store,
                        calling_ae="MODALITY", alerts=notifier, wake=exporter.wake)

1. the result UIDs of the source instance are read from the ``results`` table (generated and
   stored on first use), so a retry rebuilds the same objects instead of duplicates;
2. SEG, SR and GSPS (and, with ``[export] secondary_capture``, a Secondary Capture of the
   picture ``shadowspot analyze`` draws) are built (``node.encode``) and written atomically to
   ``<storage>/results/<StudyInstanceUID>/<kind>-<SOPInstanceUID>.dcm``;
3. if the calling AE has a ``send_results_to`` destination, one delivery per object is queued
   for it (``node.deliveries``) and the exporter is woken; otherwise the files just stay;
4. if a finding reached the alert grade, the alert is logged and sent (``node.alerts``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from node.alerts import Alert, AlertNotifier
from node.analyze import render
from node.config import Config
from node.deliveries import DeliveryStore, NewDelivery
from node.encode import EncodedObject, ObjectKind, Producer, encode_results
from node.encode.source import check_type_1
from node.errors import EncodeError
from node.logs import get_logger
from pipeline.result import AnalysisResult

RESULTS_DIR = "results"


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedObject:
    """One result object written to disk (and maybe queued)."""

    kind: ObjectKind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    delivery_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    """What ``publish`` did for one source instance."""

    study_instance_uid: str
    source_sop_instance_uid: str
    objects: tuple[PublishedObject, ...]
    destination: str | None
    alert: Alert | None


def results_folder(config: Config, study_instance_uid: str) -> Path:
    return config.node.storage / RESULTS_DIR / study_instance_uid


def destination_for(config: Config, calling_ae: str | None) -> str | None:
    """The ``[[destinations]]`` name that receives the results of ``calling_ae``, if any."""
    caller = config.caller(calling_ae) if calling_ae else None
    return None if caller is None else caller.send_results_to


def producer_for(config: Config, result: AnalysisResult) -> Producer:
    """The equipment/algorithm description of this node and the result's model."""
    return Producer(
        model_name=result.model_name,
        model_version=result.model_version,
        device_serial_number=config.node.ae_title.strip(),
    )


def burned_in_picture(config: Config, result: AnalysisResult) -> npt.NDArray[np.uint8]:
    """The Secondary Capture's picture: enhanced image, grade-coloured contours with labels,
    legend bar (the first frame of ``shadowspot analyze``'s PNG), as RGB bytes."""
    frame = render(result, config.pipeline.grading)[0]
    return np.asarray(frame.convert("RGB"), dtype=np.uint8)


def publish(
    *,
    source: Dataset,
    result: AnalysisResult,
    config: Config,
    store: DeliveryStore,
    calling_ae: str | None,
    alerts: AlertNotifier | None = None,
    wake: Callable[[str], None] | None = None,
) -> Published:
    """Encode, store and queue the result objects of one analysed source instance.
    ``EncodeError`` when a result the source owes (SEG with findings, SR) cannot be built,
    or the source lacks a Type 1 UID every result needs."""
    check_type_1(source)
    study_uid = str(source.StudyInstanceUID)
    source_uid = str(source.SOPInstanceUID)
    log = get_logger("node.results", study_instance_uid=study_uid, sop_instance_uid=source_uid)
    uids = store.result_uids(source_uid, study_uid)
    objects = encode_results(
        source=source,
        result=result,
        uids=uids,
        producer=producer_for(config, result),
        segmentation_type=config.export.segmentation_type,
        presentation_state=config.export.presentation_state,
        burned_in=burned_in_picture(config, result) if config.export.secondary_capture else None,
    )
    folder = results_folder(config, study_uid)
    paths = [_write(folder, obj) for obj in objects]
    destination = destination_for(config, calling_ae)
    delivery_ids: list[int | None] = [None] * len(objects)
    if destination is not None:
        delivery_ids = list(
            store.enqueue(destination, [_new(o, p) for o, p in zip(objects, paths, strict=True)])
        )
    published = tuple(
        PublishedObject(
            kind=o.kind,
            sop_class_uid=o.sop_class_uid,
            sop_instance_uid=o.sop_instance_uid,
            series_instance_uid=str(o.dataset.SeriesInstanceUID),
            transfer_syntax_uid=str(o.dataset.file_meta.TransferSyntaxUID),
            path=p,
            delivery_id=d,
        )
        for o, p, d in zip(objects, paths, delivery_ids, strict=True)
    )
    sr_uid = next(o.sop_instance_uid for o in objects if o.kind is ObjectKind.SR)
    alert = Alert.from_result(
        result,
        study_instance_uid=study_uid,
        sop_instance_uid=source_uid,
        sr_sop_instance_uid=sr_uid,
    )
    if alert is not None and alerts is not None:
        alerts.notify(alert)
    log.info(
        "results_published",
        kinds=[o.kind.value for o in objects],
        findings=len(result.findings),
        destination=destination,
        alert=alert is not None,
    )
    if destination is not None and wake is not None:
        wake(destination)
    return Published(
        study_instance_uid=study_uid,
        source_sop_instance_uid=source_uid,
        objects=published,
        destination=destination,
        alert=alert,
    )


def _new(obj: EncodedObject, path: Path) -> NewDelivery:
    return NewDelivery(
        study_instance_uid=str(obj.dataset.StudyInstanceUID),
        sop_instance_uid=obj.sop_instance_uid,
        sop_class_uid=obj.sop_class_uid,
        transfer_syntax_uid=str(obj.dataset.file_meta.TransferSyntaxUID),
        kind=obj.kind.value,
        path=path,
    )


def _write(folder: Path, obj: EncodedObject) -> Path:
    """Write ``obj`` as a DICOM file: temp file, fsync, atomic rename (a reader never sees a
    half-written object; a rewrite on retry replaces the file with the same UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{obj.kind.value.lower()}-{obj.sop_instance_uid}.dcm"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            obj.dataset.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise EncodeError(f"cannot write {target}: {exc}") from exc
        raise
    return target

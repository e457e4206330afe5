"""Every file shipped in pydicom's own test data, sent to a real ``shadowspot serve``.

Each file is sent twice: once as itself (its SOP class and transfer syntax proposed; classes
the node does not store are refused at negotiation, which is the right answer), and once with
its dataset bytes under the CR SOP class, so that every file, readable or not, goes through the
C-STORE handler. Each C-STORE must get a status the node defines; every success must be in the
queue and on disk and end analysed, skipped or failed with a reason; every failure must be in
quarantine with its reason; the node stays up, answers C-ECHO, and writes nothing outside its
storage folder.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pynetdicom import build_context

from node.dimse import Status
from tests.faults.conftest import (
    db_rows,
    echo,
    files_outside_storage,
    meta_file,
    scu,
    wait_for,
)

pytestmark = pytest.mark.network

PYDICOM_DATA = Path(pydicom.data.__file__).parent
CR = uid.ComputedRadiographyImageStorage
MAX_CONTEXTS = 120


def pydicom_files() -> list[Path]:
    files = sorted(
        p
        for folder in ("test_files", "charset_files")
        for p in (PYDICOM_DATA / folder).rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    )
    if len(files) < 100:
        pytest.skip(f"pydicom ships only {len(files)} test files here (expected 150+)")
    return files


@functools.cache
def header(path: Path) -> tuple[str, str, str] | None:
    """(SOP class, SOP instance, transfer syntax) from the file meta, or None."""
    try:
        with warnings.catch_warnings():  # pydicom warns about the oddities these files test
            warnings.simplefilter("ignore")
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):
        return None
    values = [
        meta.get("MediaStorageSOPClassUID"),
        meta.get("MediaStorageSOPInstanceUID"),
        meta.get("TransferSyntaxUID"),
    ]
    if not all(values):
        return None
    return str(values[0]), str(values[1]), str(values[2])


def dataset_part(path: Path) -> bytes:
    """The bytes after the preamble and file meta (the whole file when it has none)."""
    data = path.read_bytes()
    try:
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.filereader.read_preamble(f, force=True)
            pydicom.filereader._read_file_meta_info(f)
            return data[f.tell() :]
    except Exception:  # anything unreadable is sent whole: that is the point of the test
        return data


def send(
    port: int, jobs: list[tuple[str, Path, str]], contexts: set[tuple[str, str]]
) -> dict[str, int | str]:
    """Send ``(label, file, sop_class)`` over associations proposing ``contexts``; the status
    (or why nothing was sent) per label."""
    outcome: dict[str, int | str] = {}
    pending = list(jobs)
    ordered = sorted(contexts)
    for start in range(0, len(ordered), MAX_CONTEXTS):
        chunk = set(ordered[start : start + MAX_CONTEXTS])
        batch = [j for j in pending if (j[2], header(j[1])[2]) in chunk]  # type: ignore[index]
        ae = scu()
        ae.requested_contexts = [build_context(c, [t]) for c, t in sorted(chunk)]
        assoc = ae.associate("127.0.0.1", port, ae_title="SHADOWSPOT")
        assert assoc.is_established, "the node refused a plain association"
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        for label, path, sop_class in batch:
            ts = header(path)[2]  # type: ignore[index]
            if (sop_class, ts) not in accepted:
                outcome[label] = "refused at negotiation"
                continue
            if not assoc.is_established:  # the node ended the association: a failure
                outcome[label] = "association lost"
                continue
            status = assoc.send_c_store(path)
            outcome[label] = int(status.Status) if "Status" in status else "no status"
        if assoc.is_established:
            assoc.release()
    return outcome


@pytest.mark.slow
def test_every_pydicom_test_file_gets_a_sensible_answer(
    start_node, tmp_path: Path, raw_sending: None
) -> None:
    """Every pydicom test file, as itself and as a CR dataset: a defined status each, success
    means queued and on disk and later analysed/skipped/failed with a reason, failure means
    quarantined with a reason; the node survives, echoes, and writes only in storage."""
    node = start_node(node={"study_quiet_seconds": 0.3})
    files = pydicom_files()
    wrapped_dir = tmp_path / "as-cr"
    wrapped_dir.mkdir()
    native: list[tuple[str, Path, str]] = []
    as_cr: list[tuple[str, Path, str]] = []
    for i, path in enumerate(files):
        name = str(path.relative_to(PYDICOM_DATA))
        found = header(path)
        if found is not None:
            native.append((f"native {name}", path, found[0]))
        ts = found[2] if found is not None else uid.ExplicitVRLittleEndian
        wrapped = meta_file(
            wrapped_dir / f"{i:03d}.dcm",
            dataset_part(path),
            sop_class=CR,
            sop_instance=found[1] if found is not None else uid.generate_uid(),
            transfer_syntax=ts,
        )
        as_cr.append((f"as-CR {name}", wrapped, CR))
    outcomes = send(node.port, native, {(j[2], header(j[1])[2]) for j in native})  # type: ignore[index]
    outcomes |= send(node.port, as_cr, {(CR, header(j[1])[2]) for j in as_cr})  # type: ignore[index]

    assert node.alive(), node.tail()
    assert echo(node.port) == Status.SUCCESS
    assert len(outcomes) == len(native) + len(as_cr)
    undefined = {k: v for k, v in outcomes.items() if isinstance(v, str) and "negotiation" not in v}
    assert not undefined, f"C-STOREs without a status: {undefined}"
    statuses = {k: v for k, v in outcomes.items() if isinstance(v, int)}
    bad = {k: hex(v) for k, v in statuses.items() if v not in Status._value2member_map_}
    assert not bad, f"statuses the node does not define: {bad}"

    succeeded = [k for k, v in statuses.items() if v == Status.SUCCESS]
    failed = [k for k, v in statuses.items() if v != Status.SUCCESS]
    stored = db_rows(node, "SELECT sop_instance_uid, path FROM instances")
    for _, path in stored:
        assert Path(path).is_file() and node.storage in Path(path).parents
    # Sent twice (native and as CR) with the same instance UID: stored once, acknowledged twice.
    assert 0 < len(stored) <= len(succeeded)
    reasons = sorted((node.storage / "quarantine").glob("*.reason.json"))
    assert len(reasons) == len(failed), (len(reasons), Counter(hex(statuses[k]) for k in failed))
    for reason in reasons:
        record = json.loads(reason.read_text())
        assert record["reason"] and record["status"] != "0x0000"

    def all_finished() -> bool:
        states = db_rows(node, "SELECT state FROM instances")
        return all(s in ("analysed", "skipped", "failed") for (s,) in states)

    wait_for(all_finished, 90.0, "every stored instance to be analysed, skipped or failed")
    for state, reason in db_rows(node, "SELECT state, reason FROM instances"):
        if state != "analysed":
            assert reason, f"instance {state} without a reason"
    assert node.alive(), node.tail()
    assert echo(node.port) == Status.SUCCESS
    assert files_outside_storage(node) == []
    summary = Counter(v if isinstance(v, str) else Status(v).name for v in outcomes.values())
    print(f"pydicom files: {len(files)}, C-STOREs attempted: {len(outcomes)}, outcomes: {summary}")

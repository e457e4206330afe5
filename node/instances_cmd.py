"""``shadowspot retry --instances``: analyse failed or stuck instances again.

Takes the abandoned instances (``node.queue``: failed, or stuck unfinished in a job that is
over) that the arguments select: SOP Instance UIDs, ``--study`` UIDs, or ``--all``;
``--state failed|stuck`` narrows to one kind. Each goes back to ``received`` in the node's
database, out of its old job: the worker of a running node forms a new job of them at its next
look (with the job's full attempts), and a node that is not running does so when it starts.
An instance whose spool file is gone (removed by ``[retention]``) is not re-queued: only a
resend from the modality brings it back.

Prints one line per re-queued instance, one per named instance it did not re-queue (and why),
then a count. Exit code 1 when a named instance was not re-queued.
"""

from __future__ import annotations

import argparse
import sys

from node.config import Config
from node.errors import NodeError
from node.queue import Abandoned, AbandonedInstance, InstanceState, Queue
from node.store.engine import DB_NAME


def _was(a: AbandonedInstance) -> str:
    if a.kind is Abandoned.FAILED:
        return f"was failed: {a.instance.reason or 'no reason recorded'}"
    job = "which no longer exists" if a.job_state is None else f"which is {a.job_state}"
    return f"was stuck: {a.instance.state} in job {a.instance.job_id}, {job}"


def _why_not(queue: Queue, sop_instance_uid: str, kinds: list[Abandoned]) -> str:
    """Why a named instance was not re-queued."""
    instance = queue.instance(sop_instance_uid)
    if instance is None:
        return "no instance with this SOP Instance UID was received"
    other = queue.abandoned(sop_instance_uids=[sop_instance_uid])
    if other:
        return f"it is {other[0].kind}, not {' or '.join(kinds)}"
    if instance.state in (InstanceState.ANALYSED, InstanceState.SKIPPED):
        return f"it is {instance.state} already"
    if instance.job_id is None:
        return "it waits for its study to go quiet: it will be analysed"
    jobs = {j.id: j.state for j in queue.jobs(instance.header.study_instance_uid)}
    job = jobs.get(instance.job_id, "gone")
    return f"it is {instance.state} in job {instance.job_id}, which is {job}: it will be processed"


def retry(args: argparse.Namespace, config: Config) -> int:
    """Re-queue the selected abandoned instances for analysis (module docstring)."""
    if not (args.ids or args.study or args.all):
        print(
            "shadowspot retry --instances: name SOP Instance UIDs, --study UID or --all",
            file=sys.stderr,
        )
        return 2
    url, db = config.database.url_or_default, config.node.storage / DB_NAME
    if url is None and not db.is_file():
        raise NodeError(f"no queue database at {db}: has the node run with this storage?")
    kinds = [Abandoned(args.state)] if args.state else list(Abandoned)
    queue = Queue(config.node.storage, study_quiet_seconds=config.node.study_quiet_seconds, url=url)
    try:
        found = queue.abandoned(
            sop_instance_uids=args.ids, study_instance_uids=args.study or (), kinds=kinds
        )
        gone = [a for a in found if not a.instance.path.is_file()]
        requeued = queue.requeue(
            [a.instance.sop_instance_uid for a in found if a.instance.path.is_file()]
        )
        for a in requeued:
            study = a.instance.header.study_instance_uid
            print(f"re-queued {a.instance.sop_instance_uid} (study {study}): {_was(a)}")
        for a in gone:
            print(
                f"not re-queued {a.instance.sop_instance_uid}: its spool file "
                f"{a.instance.path} is gone (retention); only a resend brings it back"
            )
        done = {a.instance.sop_instance_uid for a in requeued + gone}
        missed = [u for u in args.ids if u not in done]
        for sop in missed:
            print(f"not re-queued {sop}: {_why_not(queue, sop, kinds)}")
    finally:
        queue.close()
    studies = {a.instance.header.study_instance_uid for a in requeued}
    print(
        f"{len(requeued)} instance(s) of {len(studies)} study(ies) re-queued for analysis "
        "(a running node analyses them now, else the next start of serve)"
    )
    return 1 if missed or (args.ids and gone) else 0

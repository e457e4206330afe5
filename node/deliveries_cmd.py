"""``shadowspot deliveries`` (list the outbound queue) and ``shadowspot retry`` (send dead or
waiting deliveries again, now; ``retry --instances`` is ``node.instances_cmd``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from node.config import Config
from node.deliveries import Delivery, DeliveryState, DeliveryStore
from node.export import Exporter


def _store(config: Config) -> DeliveryStore:
    return DeliveryStore(
        config.node.storage,
        retry_schedule_seconds=config.export.retry_schedule_seconds,
        url=config.database.url_or_default,
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _row(d: Delivery) -> dict[str, object]:
    return {
        "id": d.id,
        "destination": d.destination,
        "state": d.state.value,
        "kind": d.kind,
        "attempts": d.attempts,
        "next_attempt": _when(d.next_attempt_at) if d.state is DeliveryState.PENDING else "-",
        "study_instance_uid": d.study_instance_uid,
        "sop_instance_uid": d.sop_instance_uid,
        "last_error": d.last_error or "",
    }


def run(args: argparse.Namespace, config: Config) -> int:
    """List deliveries (optionally one state / destination)."""
    store = _store(config)
    try:
        state = DeliveryState(args.state) if args.state else None
        rows = [_row(d) for d in store.deliveries(state=state, destination=args.destination)]
    finally:
        store.close()
    rows = rows[-args.limit :] if args.limit else rows
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no deliveries")
        return 0
    print(
        f"{'ID':>6}  {'DESTINATION':<12} {'STATE':<9} {'KIND':<4} {'TRIES':>5}  "
        f"{'NEXT ATTEMPT':<19}  SOP INSTANCE UID / LAST ERROR"
    )
    for r in rows:
        print(
            f"{r['id']:>6}  {r['destination']!s:<12} {r['state']!s:<9} {r['kind']!s:<4} "
            f"{r['attempts']:>5}  {r['next_attempt']!s:<19}  {r['sop_instance_uid']}"
        )
        if r["last_error"]:
            print(f"{'':>8}last error: {r['last_error']}")
    return 0


def retry(args: argparse.Namespace, config: Config) -> int:
    """Re-arm the chosen deliveries (ids, or all dead ones; ``--pending`` adds the waiting
    ones; ``--study`` narrows to studies) and, unless ``--queue-only``, send them now.

    A destination that a running node (or another ``retry``) is sending to right now is left
    to it: never two associations to one destination at once (``node.export``)."""
    try:
        ids = [int(i) for i in args.ids]
    except ValueError:
        print(
            "shadowspot retry: delivery ids are numbers (for SOP Instance UIDs: --instances)",
            file=sys.stderr,
        )
        return 2
    store = _store(config)
    try:
        states = [DeliveryState.DEAD] + ([DeliveryState.PENDING] if args.pending else [])
        picked = store.retry(ids, states=states, study_instance_uids=args.study or ())
        print(f"{len(picked)} deliveries queued for sending now")
        if args.queue_only or not picked:
            return 0
        return _send_now(config, store, set(picked))
    finally:
        store.close()


def _send_now(config: Config, store: DeliveryStore, picked: set[int]) -> int:
    chosen = {d.destination for d in store.deliveries() if d.id in picked}
    exporter = Exporter(config, store)
    failed = 0
    for destination in config.destinations:
        if destination.name not in chosen:
            continue
        outcomes = exporter.run_once(destination)
        if outcomes is None:
            print(
                f"{destination.name}: another exporter is sending to it now (a running node "
                "sends these next; without one, run retry again)"
            )
            continue
        delivered = sum(o.state is DeliveryState.DELIVERED for o in outcomes)
        failed += len(outcomes) - delivered
        print(
            f"{destination.name}: {delivered} delivered, {len(outcomes) - delivered} not delivered"
        )
    return 0 if failed == 0 else 1

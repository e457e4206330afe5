"""``shadowspot deliveries`` (list the outbound queue) and ``shadowspot retry`` (send dead or
waiting deliveries again, now)."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from node.config import Config
from node.deliveries import Delivery, DeliveryState, DeliveryStore
from node.export import Exporter


def _store(config: Config) -> DeliveryStore:
    return DeliveryStore(
        config.node.storage, retry_schedule_seconds=config.export.retry_schedule_seconds
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
    ones) and, unless ``--queue-only``, send them now."""
    store = _store(config)
    try:
        states = [DeliveryState.DEAD] + ([DeliveryState.PENDING] if args.pending else [])
        picked = store.retry(args.ids or (), states=states)
        print(f"{len(picked)} deliveries queued for sending now")
        if args.queue_only or not picked:
            return 0
        chosen = {d.destination for d in store.deliveries() if d.id in set(picked)}
        exporter = Exporter(config, store)
        failed = 0
        for destination in config.destinations:
            if destination.name in chosen:
                outcomes = exporter.run_once(destination)
                delivered = sum(o.state is DeliveryState.DELIVERED for o in outcomes)
                failed += len(outcomes) - delivered
                print(
                    f"{destination.name}: {delivered} delivered, "
                    f"{len(outcomes) - delivered} not delivered"
                )
        return 0 if failed == 0 else 1
    finally:
        store.close()

"""``shadowspot echo``: check a DICOM peer with C-ECHO, the way IT staff test a destination.

The peer is a ``[[destinations]]`` entry (``--destination NAME``) or ``--host/--port/--ae``.
We call from our own AE title (``[node] ae_title``). Exit code 0: the peer answered Success;
1: it rejected, aborted, timed out or answered another status; 2: the command line is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time

from pydicom import uid
from pynetdicom import AE, _config

from node.config import Config
from node.dimse import VERIFICATION_SOP_CLASS, Status

_config.LOG_HANDLER_LEVEL = "none"


def _target(args: argparse.Namespace, config: Config) -> tuple[str, int, str] | str:
    """(host, port, called AE) from the arguments, or the reason they do not name a peer."""
    if args.destination is not None:
        try:
            dest = config.destination(args.destination)
        except KeyError:
            known = ", ".join(d.name for d in config.destinations) or "none configured"
            return f"no destination named {args.destination!r} in {config.source} (known: {known})"
        return dest.host, dest.port, dest.ae_title
    if args.host is None or args.port is None or args.ae is None:
        return "give --destination NAME, or all of --host, --port and --ae"
    if not 1 <= args.port <= 65535:
        return f"--port must be between 1 and 65535, got {args.port}"
    return args.host, args.port, args.ae


def run(args: argparse.Namespace, config: Config) -> int:
    target = _target(args, config)
    if isinstance(target, str):
        print(f"shadowspot echo: {target}", file=sys.stderr)
        return 2
    host, port, called = target
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(
        VERIFICATION_SOP_CLASS, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
    )
    peer = f"{called}@{host}:{port}"
    started = time.monotonic()
    assoc = ae.associate(host, port, ae_title=called)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        why = f"{rj.result_str}, {rj.source_str}: {rj.reason_str}" if rj is not None else ""
        print(f"C-ECHO {peer}: association rejected ({why})")
        return 1
    if not assoc.is_established:
        print(f"C-ECHO {peer}: no association (connection refused, aborted or timed out)")
        return 1
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = (time.monotonic() - started) * 1000
    if "Status" not in response:
        print(f"C-ECHO {peer}: no response within {args.timeout:g} s")
        return 1
    code = int(response.Status)
    try:
        name = Status(code).name
    except ValueError:
        name = "unknown status"
    print(f"C-ECHO {peer}: {name} (0x{code:04X}) in {ms:.0f} ms, called as {config.node.ae_title}")
    return 0 if code == Status.SUCCESS else 1

"""The ``shadowspot`` command: one entry point, one subcommand per thing IT staff do.

Each subcommand is a thin adapter: parse arguments, load the one ``Config``, call the module
that does the work. Modules are imported lazily so ``--help`` and ``check-config`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from node import __version__
from node.config import DEFAULT_CONFIG_PATH, Config, load_config
from node.errors import ConfigError
from pipeline.errors import ShadowSpotError

DESCRIPTION = """\
ShadowSpot: a DICOM node that reads chest X-rays for shadows (patchy opacities) and
spots (nodules) and sends a SEG, a TID 1500 SR and a presentation state back to the PACS.

Typical use:
  shadowspot check-config --config config/shadowspot.toml   # see every mistake at once
  shadowspot serve --config config/shadowspot.toml          # run the node
  shadowspot echo --host 127.0.0.1 --port 4242 --ae ORTHANC # test a destination (C-ECHO)
  shadowspot analyze image.dcm --out results/               # analyse files without the network

Without --config, config/shadowspot.toml is used if it exists, else the embedded defaults.
"""


def _resolve_config(path: Path | None) -> Config:
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
        print(f"shadowspot: using {path} (no --config given)", file=sys.stderr)
    return load_config(path)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH} if present, "
        "else the embedded defaults)",
    )


Handler = Callable[[argparse.Namespace, Config], int]


def _lazy(module: str, function: str = "run") -> Handler:
    """A handler that imports ``module`` only when its subcommand runs."""

    def handler(args: argparse.Namespace, config: Config) -> int:
        target: Handler = getattr(importlib.import_module(module), function)
        return target(args, config)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadowspot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=None,
        help="log output: JSON lines (default, from the config) or human-readable console",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check-config", help="validate a configuration file and list every problem")
    _add_config(p)
    p.set_defaults(handler=_check_config)

    p = sub.add_parser("serve", help="run the DICOM node (Storage SCP, queue, analysis, export)")
    _add_config(p)
    p.set_defaults(handler=_lazy("node.serve"))

    p = sub.add_parser(
        "echo", help="check a DICOM peer with C-ECHO, as IT staff test a destination"
    )
    _add_config(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--destination",
        metavar="NAME",
        help="a [[destinations]] name from the config",
    )
    target.add_argument("--host", help="peer address (with --port and --ae)")
    p.add_argument("--port", type=int, help="peer port")
    p.add_argument("--ae", metavar="AE_TITLE", help="peer (called) AE title")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    p.set_defaults(handler=_lazy("node.echo"))

    p = sub.add_parser(
        "analyze",
        help="run the pipeline on DICOM, PNG or JPEG files and write JSON + PNG",
    )
    _add_config(p)
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--spacing",
        type=float,
        metavar="MM",
        help="pixel spacing in mm for PNG/JPEG inputs (DICOM files carry their own)",
    )
    p.set_defaults(handler=_lazy("node.analyze"))

    p = sub.add_parser(
        "status",
        help="queue depth, recent studies with outcome and latency, dead-letter deliveries",
    )
    _add_config(p)
    p.add_argument("--limit", type=int, default=10, metavar="N", help="studies to list (10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_lazy("node.status_cmd"))

    p = sub.add_parser(
        "migrate",
        help="upgrade the database ([database] url) to this version's schema",
    )
    _add_config(p)
    p.set_defaults(handler=_lazy("node.migrate_cmd"))

    p = sub.add_parser("cleanup", help="remove spool and result files older than [retention]")
    _add_config(p)
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--verbose", action="store_true", help="print every path removed")
    p.set_defaults(handler=_lazy("node.retention"))

    p = sub.add_parser("deliveries", help="list result deliveries to the PACS and their state")
    _add_config(p)
    p.add_argument(
        "--state", choices=("pending", "sending", "delivered", "dead"), help="only this state"
    )
    p.add_argument("--destination", metavar="NAME", help="only this destination")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the last N")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_lazy("node.deliveries_cmd"))

    p = sub.add_parser(
        "retry",
        help="send dead-lettered deliveries again, now; with --instances, analyse failed or "
        "stuck instances again",
    )
    _add_config(p)
    p.add_argument(
        "ids",
        nargs="*",
        metavar="ID",
        help="delivery ids (default: all dead), or with --instances SOP Instance UIDs",
    )
    p.add_argument(
        "--instances",
        action="store_true",
        help="re-queue failed or stuck instances for analysis (not deliveries)",
    )
    p.add_argument(
        "--study", action="append", metavar="UID", help="only this study (may be repeated)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="every dead delivery (the default), or with --instances every failed or stuck one",
    )
    p.add_argument(
        "--state",
        choices=("failed", "stuck"),
        help="with --instances: only failed ones, or only stuck ones (unfinished in a job "
        "that is over)",
    )
    p.add_argument("--pending", action="store_true", help="also the ones waiting for a retry")
    p.add_argument(
        "--queue-only", action="store_true", help="only re-queue; a running node sends them"
    )
    p.set_defaults(handler=_retry)

    return parser


def _retry(args: argparse.Namespace, config: Config) -> int:
    """``retry``: deliveries (``node.deliveries_cmd``) or, with --instances, instances
    (``node.instances_cmd``)."""
    problem = None
    if args.all and (args.ids or args.study):
        problem = "--all selects everything: leave out IDs and --study"
    elif args.instances and (args.pending or args.queue_only):
        problem = "--pending and --queue-only are for deliveries (--instances only re-queues)"
    elif args.state and not args.instances:
        problem = "--state is for --instances (for deliveries: --pending)"
    if problem is not None:
        print(f"shadowspot retry: {problem}", file=sys.stderr)
        return 2
    module = "node.instances_cmd" if args.instances else "node.deliveries_cmd"
    return _lazy(module, "retry")(args, config)


def _check_config(args: argparse.Namespace, config: Config) -> int:
    from node.analysis import Analyser  # loads the model exactly as serve does
    from pipeline.errors import PipelineError

    try:
        analyser = Analyser(config.pipeline)
    except PipelineError as exc:
        print(f"{config.source}: pipeline.model_dir: {config.pipeline.model_dir}: {exc}")
        print("  serve would refuse to start (or, with [node] require_model = false, queue")
        print("  every job as waiting_for_pipeline)")
        return 2
    print(f"{config.source}: OK")
    model = analyser.model
    print(f"  model {model.name} {model.version} from {config.pipeline.model_dir}")
    print(
        f"  node {config.node.ae_title} on {config.node.host}:{config.node.port}, "
        f"storage {config.node.storage}"
    )
    callers = ", ".join(c.ae_title for c in config.callers) or "anyone (no [[callers]] listed)"
    print(f"  callers: {callers}")
    dests = ", ".join(f"{d.name}={d.ae_title}@{d.host}:{d.port}" for d in config.destinations)
    print(f"  destinations: {dests or 'none (results kept under storage/results)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _resolve_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        code: int = args.handler(args, config)
    except ShadowSpotError as exc:
        print(f"shadowspot {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `shadowspot deliveries --json | head`: the reader left
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())

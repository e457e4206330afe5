"""Evaluate the shipped model on any ``cxr-lesions`` folder, through the real pipeline.

    python -m models.training.evaluate ../shared/data/cxr-lesions --split val --out bench/work/eval

For every image the engine returns findings (group, box in input pixels, probability, alert,
mask) and the lung mask. ``--engine pipeline`` (default) runs ``pipeline.analyse`` on a
``SourceImage``; ``--engine network`` runs the ONNX model alone with connected components
(the reference the pipeline must not fall below). Each engine runs twice: with the finding
thresholds lowered to ``--sweep-threshold`` (candidates for FROC, AP50, AUROC) and at the
manifest's operating point (hits, Dice, normal studies with findings / alerts). The no-image
baseline puts the same four lung-quadrant boxes on every image. Writes ``summary.json`` and
``froc.png`` to ``--out`` and prints the table.

This module is the command line; the engines are in ``engines``, the figures in ``scoring``
(over ``metrics``), the operating-point fits in ``fits`` and the steps that write them into
the manifest in ``fit_steps``, the plot, table and headline in ``report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.training import fit_steps
from models.training.dataset import TEST_PATIENTS, Record, read_records, split_by_patient
from models.training.engines import Analysed, Evaluation, engine_for, image_of
from models.training.report import manifest_metrics, plot_froc, table
from models.training.scoring import baseline, score, worst

REPO = Path(__file__).resolve().parents[2]
FITS: dict[str, tuple[Callable[[Evaluation, Sequence[Record]], int], str]] = {
    "fit_extent_scale": (
        fit_steps.extent_scale,
        "fit each finding group's region scale on this split (use train) through the "
        "pipeline, write it to the manifest's operating point, exit",
    ),
    "fit_box_weight": (
        fit_steps.box_weight,
        "a model with a box head: fit each finding group's box weight on this split "
        "(use train) through the pipeline, write it to the manifest's operating point, exit",
    ),
    "fit_support_power": (
        fit_steps.support_power,
        "fit each finding group's support power on this split (use train) through the "
        "pipeline, write it to the manifest's operating point, exit",
    ),
    "fit_zoom_scales": (
        fit_steps.zoom_scales,
        "choose the S300 zoom scales on this split (use train) through the pipeline, "
        "write them to the manifest's operating point, exit",
    ),
    "fit_view_fusion": (
        fit_steps.view_fusion,
        "a model with zoom scales: choose each finding group's S300 view fusion (mean "
        "or max of the views) on this split (use train) through the pipeline, write it to the "
        "manifest's operating point, exit",
    ),
    "fit_ensemble_weights": (
        fit_steps.ensemble_weights,
        "a two-member ensemble (models.training.ensemble): choose its weights of "
        "ENSEMBLE_CHOICES (with boxes per finding channel: per group, of "
        "GROUP_ENSEMBLE_CHOICES) on this split (use train) through the pipeline, write them "
        "into its graph and manifest, exit",
    ),
}
"""Each ``--fit-*`` option (its destination), the step it runs and its help; the first one
given runs, in this order."""


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """What to evaluate and how: the data, its split, the model, the engine and its settings."""
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--split",
        choices=("val", "train", "test", "all"),
        default="all",
        help="test: the locked test split (test-patients.json), once per release candidate, "
        "after its rule to ship is written down; never with a --fit-* or "
        "--choose-operating-point",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models")
    parser.add_argument("--engine", choices=("pipeline", "network"), default="pipeline")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="pipeline engine: a node configuration whose [pipeline] section is used "
        "(default: the embedded defaults)",
    )
    parser.add_argument("--sweep-threshold", type=float, default=0.05)
    parser.add_argument(
        "--relative",
        type=float,
        default=0.5,
        help="network engine: cut each component to ≥ this share of its peak",
    )
    parser.add_argument("--limit", type=int, default=0, help="first N images only (smoke runs)")


def build_parser() -> argparse.ArgumentParser:
    """The command's options: the run's, then the steps that write into the manifest."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    _add_run_options(parser)
    parser.add_argument(
        "--choose-operating-point",
        action="store_true",
        help="pick thresholds on this split's normals through the engine and write them to "
        "the manifest",
    )
    for dest, (_, help_text) in FITS.items():
        parser.add_argument(f"--{dest.replace('_', '-')}", action="store_true", help=help_text)
    parser.add_argument(
        "--write-metrics",
        action="store_true",
        help="write the headline figures into the manifest's metrics",
    )
    return parser


def _sees_locked_test(records: Sequence[Record], split: str) -> bool:
    """Whether ``split`` of ``records`` holds a patient of the committed locked test split."""
    if split == "test":
        return True
    if split != "all" or not TEST_PATIENTS.exists():
        return False
    listed = json.loads(TEST_PATIENTS.read_text())["patients"]
    locked = {p for patients in listed.values() for p in patients}
    return any(r.patient in locked for r in records)


def _records(args: argparse.Namespace) -> list[Record]:
    """The records of the command's split (the first ``--limit``); a fit or choice on a
    split that holds locked test patients is refused."""
    records = read_records(args.data_dir)
    fits = [k for k, v in vars(args).items() if k.startswith(("fit_", "choose_")) and v]
    if fits and _sees_locked_test(records, args.split):
        flag = "--" + fits[0].replace("_", "-")
        raise SystemExit(
            f"{flag} on --split {args.split}: fits and choices never see the test split"
        )
    if args.split != "all":
        records = split_by_patient(records)[args.split]
    if args.limit:
        records = records[: args.limit]
    return records


def _evaluation(args: argparse.Namespace) -> Evaluation:
    return Evaluation(
        data_dir=args.data_dir,
        split=args.split,
        model_dir=args.model_dir,
        engine=args.engine,
        config=args.config,
        sweep_threshold=args.sweep_threshold,
        relative=args.relative,
    )


def _run_both(
    ev: Evaluation, records: Sequence[Record]
) -> tuple[list[Analysed], list[Analysed], float]:
    """Each image through the engine at the sweep value and at the operating point, and the
    seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        sweep_engine, op_engine = engine_for(ev, Path(tmp)), engine_for(ev, None)
        t0 = time.monotonic()
        sweep, operating = [], []
        for r in records:
            grey = image_of(ev.data_dir, r)
            sweep.append(sweep_engine(grey))
            operating.append(op_engine(grey))
        seconds = time.monotonic() - t0
    return sweep, operating, seconds


def summarise(ev: Evaluation, records: Sequence[Record]) -> dict[str, Any]:
    """The evaluation's summary: the model's figures, the baseline's, the worst cases."""
    manifest = fit_steps.read_manifest(ev.model_dir)
    sweep, operating, seconds = _run_both(ev, records)
    summary: dict[str, Any] = {
        "data_dir": str(ev.data_dir),
        "split": ev.split,
        "engine": ev.engine,
        "model": {
            "name": manifest["name"],
            "version": manifest["version"],
            "sha256": manifest["sha256"],
            "operating_point": manifest["operating_point"],
        },
        "pipeline_config": str(ev.config) if ev.config else "embedded defaults",
        "sweep_threshold": ev.sweep_threshold,
        "seconds_per_image_both_runs": round(seconds / max(1, len(records)), 3),
    }
    summary["model"] = {**summary["model"], **score(records, sweep, operating, ev.data_dir)}
    summary["baseline"] = score(records, baseline(records), None, ev.data_dir)
    summary["worst"] = worst(records, sweep, operating)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    records = _records(args)
    ev = _evaluation(args)
    for dest, (step, _) in FITS.items():
        if getattr(args, dest):
            return step(ev, records)
    if args.choose_operating_point:
        fit_steps.choose_and_write_operating_point(ev, records)
    summary = summarise(ev, records)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_froc(summary, args.out / "froc.png")
    if args.write_metrics:
        metrics = fit_steps.read_manifest(args.model_dir).get("metrics", {})
        fit_steps.update_manifest(args.model_dir, metrics=manifest_metrics(metrics, summary))
    print(table(summary))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'froc.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The steps of ``evaluate`` that fit a model's operating point: each runs the pipeline on the
split (finding thresholds at the sweep value), fits with ``fits`` and writes the result and
its rule into the model folder's manifest (an ensemble's weights also into its graph).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from models.training.dataset import Record
from models.training.engines import Evaluation, engine_for, image_of, run_sweep
from models.training.ensemble import reweight
from models.training.ensemble_spec import per_channel_boxes
from models.training.fits import (
    BOX_WEIGHTS,
    ENSEMBLE_CHOICES,
    EXTENT_MIN_IOU,
    EXTENT_MIN_MATCHES,
    GROUP_ENSEMBLE_CHOICES,
    NORMAL_ALERT_SHARE_PER_CHANNEL,
    NORMAL_SHARE_PER_CHANNEL,
    SUPPORT_POWERS,
    ZOOM_CHOICES,
    choice_key,
    choose_operating_point,
    fit_box_weight,
    fit_ensemble_weights,
    fit_extent_scale,
    fit_per_group,
    fit_support_power,
    fit_view_fusion,
    fit_zoom_scales,
    group_choice_weights,
)
from models.training.scoring import normal_studies
from pipeline.manifest import VIEW_FUSIONS

Choice = TypeVar("Choice")
AGAIN = "--choose-operating-point again"


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """A model folder's manifest."""
    manifest: dict[str, Any] = json.loads((model_dir / "manifest.json").read_text())
    return manifest


def update_manifest(model_dir: Path, **sections: Any) -> None:
    """Replace these top-level sections of a model folder's manifest."""
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(sections)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _finding_channels(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec for spec in manifest["channels"] if spec["kind"] == "finding"]


def choose_and_write_operating_point(ev: Evaluation, records: Sequence[Record]) -> None:
    """Run the engine (thresholds at the sweep value) on the normal studies of ``records``,
    choose the operating point and write it to the manifest."""
    normals = [r for r, normal in zip(records, normal_studies(records), strict=True) if normal]
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_for(ev, Path(tmp))
        results = [engine(image_of(ev.data_dir, r)) for r in normals]
    manifest = read_manifest(ev.model_dir)
    chosen, alerts = choose_operating_point(results, manifest["channels"])
    op = manifest["operating_point"]
    op["thresholds"] = chosen
    op["alert_thresholds"] = alerts
    op["rule"] = (
        f"per channel, through the {ev.engine} (thresholds {ev.sweep_threshold}) on the "
        f"{len(normals)} normal studies of the {ev.split} split, each scored by its most "
        f"probable finding of the channel: thresholds = the lowest of 0.2..0.95 (step 0.025) "
        f"reached by at most {NORMAL_SHARE_PER_CHANNEL:.0%} of them; alert_thresholds = the "
        f"lowest of 0.2..0.999 reached by at most {NORMAL_ALERT_SHARE_PER_CHANNEL:.0%} of them"
    )
    update_manifest(ev.model_dir, operating_point=op)
    print(f"operating point: thresholds {chosen}, alert thresholds {alerts}")


def extent_scale(ev: Evaluation, records: Sequence[Record]) -> int:
    """Run the pipeline without a fitted extent (finding thresholds at the sweep value) on
    ``records``, fit ``extent_scale`` per group and write it to the manifest."""
    fitted = fit_extent_scale(records, run_sweep(ev, records, extent_scale=False))
    manifest = read_manifest(ev.model_dir)
    op = manifest["operating_point"]
    op["extent_scale"] = {
        spec["name"]: list(fitted[spec["group"]][:2]) for spec in _finding_channels(manifest)
    }
    op["extent_rule"] = (
        f"per group, on the {ev.split} split through the pipeline (thresholds "
        f"{ev.sweep_threshold}): probability-weighted geometric mean of lesion / finding "
        f"box size ratios over findings overlapping a lesion at IoU >= {EXTENT_MIN_IOU}, "
        f"(1, 1) with fewer than {EXTENT_MIN_MATCHES} matches; matches "
        + ", ".join(f"{g} {v[2]}" for g, v in fitted.items())
    )
    update_manifest(ev.model_dir, operating_point=op)
    print(f"extent scale (width, height, matches): {fitted}")
    return 0


def _write_best_of(
    ev: Evaluation,
    manifest: dict[str, Any],
    key: str,
    noun: str,
    choices: Sequence[Choice],
    fitted: Mapping[str, tuple[Choice, Mapping[Choice, float]]],
    ties: str = "the smaller",
) -> None:
    """Write a per-group choice among ``choices`` (``fitted``: group -> (chosen, AP50 by
    choice)) to the manifest's operating point as ``key``, with its rule as ``key_rule``."""
    op = manifest["operating_point"]
    op[key] = {spec["name"]: fitted[spec["group"]][0] for spec in _finding_channels(manifest)}
    op[f"{key}_rule"] = (
        f"per group, on the {ev.split} split through the pipeline (thresholds "
        f"{ev.sweep_threshold}): the {noun} of {list(choices)} with the highest AP50, "
        f"ties to {ties}; AP50 by {noun}: " + "; ".join(f"{g} {v[1]}" for g, v in fitted.items())
    )
    update_manifest(ev.model_dir, operating_point=op)


def box_weight(ev: Evaluation, records: Sequence[Record]) -> int:
    """Run the pipeline at box weight 0 and 1 (finding thresholds at the sweep value) on
    ``records``, fit ``box_weight`` per group and write it to the manifest."""
    manifest = read_manifest(ev.model_dir)
    if "box_output" not in manifest:
        raise SystemExit(f"{ev.model_dir}: the model has no box head (box_output)")
    own, head = (run_sweep(ev, records, box_weight=weight) for weight in (0.0, 1.0))
    fitted = fit_box_weight(records, own, head)
    _write_best_of(ev, manifest, "box_weight", "weight", BOX_WEIGHTS, fitted)
    print(f"box weight (weight, AP50 by weight): {fitted}")
    return 0


def support_power(ev: Evaluation, records: Sequence[Record]) -> int:
    """Run the pipeline at each power of ``SUPPORT_POWERS`` (finding thresholds at the sweep
    value) on ``records``, fit ``support_power`` per group and write it to the manifest."""
    runs = {power: run_sweep(ev, records, support_power=power) for power in SUPPORT_POWERS}
    fitted = fit_support_power(records, runs)
    manifest = read_manifest(ev.model_dir)
    _write_best_of(ev, manifest, "support_power", "power", SUPPORT_POWERS, fitted)
    print(f"support power (power, AP50 by power): {fitted}")
    print(f"the thresholds were chosen for the former power: {AGAIN}")
    return 0


def view_fusion(ev: Evaluation, records: Sequence[Record]) -> int:
    """Run the pipeline with each S300 view fusion of ``VIEW_FUSIONS`` (finding thresholds
    at the sweep value) on ``records``, fit ``view_fusion`` per group and write it to the
    manifest."""
    manifest = read_manifest(ev.model_dir)
    if not manifest["operating_point"].get("zoom_scales"):
        raise SystemExit(f"{ev.model_dir}: no zoom scales, one view: nothing to fuse")
    runs = {fusion: run_sweep(ev, records, view_fusion=fusion) for fusion in VIEW_FUSIONS}
    fitted = fit_view_fusion(records, runs)
    _write_best_of(ev, manifest, "view_fusion", "fusion", VIEW_FUSIONS, fitted, "mean")
    print(f"view fusion (fusion, AP50 by fusion): {fitted}")
    print(f"the thresholds were chosen for the former fusion: {AGAIN}")
    return 0


def zoom_scales(ev: Evaluation, records: Sequence[Record]) -> int:
    """Run the pipeline with each choice of ``ZOOM_CHOICES`` (finding thresholds at the
    sweep value) on ``records``, fit the S300 zoom scales and write them to the manifest."""
    runs = {scales: run_sweep(ev, records, zoom_scales=scales) for scales in ZOOM_CHOICES}
    best, ap = fit_zoom_scales(records, runs)
    manifest = read_manifest(ev.model_dir)
    op = manifest["operating_point"]
    op["zoom_scales"] = list(best)
    op["zoom_scales_rule"] = (
        f"on the {ev.split} split through the pipeline (thresholds {ev.sweep_threshold}): "
        f"the scales of {[list(c) for c in ZOOM_CHOICES]} with the highest AP50 averaged over "
        f"the finding groups, ties to fewer scales; AP50 by scales: {ap}"
    )
    update_manifest(ev.model_dir, operating_point=op)
    print(f"zoom scales {list(best)} (AP50 by scales: {ap})")
    print(f"the thresholds were chosen for the former scales: {AGAIN}")
    return 0


def ensemble_weights(ev: Evaluation, records: Sequence[Record]) -> int:
    """Run the pipeline with each choice of ``ENSEMBLE_CHOICES`` (finding thresholds at the
    sweep value) on ``records``, choose the ensemble's weights and write them into its
    graph and manifest."""
    manifest = read_manifest(ev.model_dir)
    if len(manifest.get("ensemble", {}).get("members", ())) != 2:
        raise SystemExit(f"{ev.model_dir}: not an ensemble of two members")
    if per_channel_boxes(manifest["ensemble"]["weights"]):
        return _group_ensemble_weights(ev, records, manifest)
    runs = {c: run_sweep(ev, records, ensemble_weights=c) for c in ENSEMBLE_CHOICES}
    best, ap = fit_ensemble_weights(records, runs)
    rule = (
        f": the weights of [{'; '.join(choice_key(c) for c in ENSEMBLE_CHOICES)}] with the "
        f"highest AP50 averaged over the finding groups, ties to the earlier; AP50 by "
        f"weights: {ap}"
    )
    return _write_ensemble_fit(ev, dict(best), rule, choice_key(best))


def _group_ensemble_weights(
    ev: Evaluation, records: Sequence[Record], manifest: dict[str, Any]
) -> int:
    """``ensemble_weights`` for an ensemble with boxes per finding channel: each of
    ``GROUP_ENSEMBLE_CHOICES`` runs for every finding channel at once, and each group keeps
    its own best (``fit_per_group``: its highest AP50, ties to the earlier choice)."""
    channels = [c for c in manifest["channels"] if c.get("kind") == "finding"]
    findings = [c["name"] for c in channels]
    runs = {
        c: run_sweep(ev, records, ensemble_weights=group_choice_weights(c, findings))
        for c in GROUP_ENSEMBLE_CHOICES
    }
    fitted = fit_per_group(records, runs)
    changes: dict[str, Sequence[float]] = {}
    for c in channels:
        changes.update(dict(group_choice_weights(fitted[c["group"]][0], [c["name"]])))
    ap = {g: {choice_key(k): v for k, v in row.items()} for g, (_, row) in fitted.items()}
    rule = (
        f", per finding group: the map and box weights of "
        f"[{'; '.join(choice_key(c) for c in GROUP_ENSEMBLE_CHOICES)}] with the group's "
        f"highest AP50, ties to the earlier; AP50 by weights: {ap}"
    )
    chosen = {g: choice_key(best) for g, (best, _) in fitted.items()}
    return _write_ensemble_fit(ev, changes, rule, f"per group {chosen}")


def _write_ensemble_fit(
    ev: Evaluation, changes: dict[str, Sequence[float]], rule: str, chosen: str
) -> int:
    """Write fitted ensemble weights into the graph and their rule into the manifest."""
    reweight(ev.model_dir, changes)
    manifest = read_manifest(ev.model_dir)
    manifest["ensemble"]["weights_rule"] = (
        f"on the {ev.split} split through the pipeline (thresholds {ev.sweep_threshold})" + rule
    )
    update_manifest(ev.model_dir, ensemble=manifest["ensemble"])
    print(f"ensemble weights {chosen} ({manifest['ensemble']['weights_rule']})")
    print(f"the thresholds were chosen for the former weights: {AGAIN}")
    return 0

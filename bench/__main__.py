"""Run the whole benchmark, write ``bench/results.json`` and print a Markdown table.

    .venv/bin/python -m bench            # or: make bench
    .venv/bin/python -m bench --quick    # 10 images, 8 studies: a smoke run, not for the README

Parts, in order (each also runs on its own, see its module):

1. load (``bench.load``): generated CR/DX chest radiographs, 2048×2500, 12–16 bit, every 4th
   JPEG 2000 lossless, Type 1/2 attributes filled;
2. intake (``bench.intake``): DCMTK ``storescu`` → ``shadowspot serve`` and → DCMTK
   ``storescp``, alternately, ``--images`` images per run, median of ``--repeats`` runs;
3. end to end (``bench.end_to_end``): C-STORE of a study → SEG, SR, GSPS stored at a DCMTK
   ``storescp``, for one modality and for four at once;
4. pipeline (``bench/bench_pipeline.py --json``): per-step median ms for one 2048×2500 image;
5. model (``bench/bench_model.py``): ONNX inference ms at the working size;
6. memory (``bench.memory``): peak RSS of every process started above.

Needs DCMTK (``apt-get install dcmtk``) and the shipped model in ``models/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import end_to_end, intake, memory
from bench.load import REPO

RESULTS = REPO / "bench" / "results.json"


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy it was when we started."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def _script_json(script: str, *args: str) -> dict[str, Any]:
    """Run one of the existing bench scripts and parse the JSON object it prints last."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"{script} exited {done.returncode}: {done.stderr[-400:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    print(f"-- {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # one failing part must not hide the others' numbers
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        print(f"-- {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine()}
    results["intake"] = _timed("intake", intake.run, args.images, args.repeats)
    results["end_to_end"] = _timed(
        "end to end",
        end_to_end.run,
        args.studies,
        quiet_seconds=args.quiet,
        workers=args.workers,
    )
    results["pipeline"] = _timed(
        "pipeline", _script_json, "bench_pipeline.py", "--json", "--runs", str(args.pipeline_runs)
    )
    results["model"] = _timed("model", _script_json, "bench_model.py", "--runs", "30")
    peaks: dict[str, dict[str, int | None]] = {}
    for part in ("intake", "end_to_end"):
        found = results[part].get("peak_rss_bytes") if isinstance(results[part], dict) else None
        if found:
            peaks[part] = found
    if isinstance(results["pipeline"].get("peak_rss_mb"), int | float):
        peaks["pipeline"] = {"bench_pipeline": int(results["pipeline"]["peak_rss_mb"] * 1e6)}
    results["memory"] = memory.summarise(peaks)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    return f"{value}{unit}"


def table(results: dict[str, Any]) -> str:
    """The Markdown table of the README's Performance section."""
    rows: list[tuple[str, str, str]] = []
    m = results["machine"]
    intake_ = results.get("intake", {})
    if "error" in intake_:
        rows.append(("Intake", "error", intake_["error"]))
    elif intake_:
        ours, theirs = intake_["shadowspot"], intake_["storescp"]
        what = f"{intake_['images']} images, {intake_['megabytes']} MB, one association"
        rows += [
            (
                "Intake, shadowspot serve (fsync)",
                f"{ours['images_per_s']} img/s, {ours['mb_per_s']} MB/s",
                what,
            ),
            (
                f"Intake, DCMTK storescp ({'fsync' if theirs['fsync'] else 'no fsync'})",
                f"{theirs['images_per_s']} img/s, {theirs['mb_per_s']} MB/s",
                f"median of {intake_['repeats']} runs each",
            ),
            ("Intake ratio ours / DCMTK", f"{intake_['ratio_ours_to_dcmtk']}×", "target ≥ 1"),
        ]
    e2e = results.get("end_to_end", {})
    if "error" in e2e:
        rows.append(("End to end", "error", e2e["error"]))
    elif e2e:
        for key, label in (("one_modality", "1 modality"), ("four_modalities", "4 modalities")):
            s = e2e[key]
            quiet = e2e["study_quiet_seconds"]
            note = f"{s['studies']} studies, {len(s['failed'])} failed, quiet {quiet} s"
            rows.append(
                (
                    f"End to end, {label}: median / p95",
                    f"{_fmt(s.get('median_s'), ' s')} / {_fmt(s.get('p95_s'), ' s')}",
                    note + (", target < 1.5 s / < 3 s" if key == "one_modality" else ""),
                )
            )
            rows.append((f"Studies per minute, {label}", _fmt(s.get("studies_per_min")), ""))
            phases = s.get("phases_median_s", {})
            if phases:
                rows.append(
                    (
                        f"End to end, {label}: where the time goes (medians)",
                        ", ".join(f"{k} {v} s" for k, v in phases.items()),
                        "from the node's log timestamps",
                    )
                )
    pipe = results.get("pipeline", {})
    if "error" in pipe:
        rows.append(("Pipeline", "error", pipe["error"]))
    elif pipe:
        for step, ms in pipe["median_ms"].items():
            rows.append((f"Pipeline step {step}", f"{ms} ms", "median, one 2048×2500 image"))
    model = results.get("model", {})
    if "error" in model:
        rows.append(("Model inference", "error", model["error"]))
    elif model:
        rows.append(
            (
                "Model inference (ONNX, batch 1)",
                f"{model['inference_ms_median']} ms",
                f"{model['working_size'][0]}×{model['working_size'][1]}, "
                f"{model['threads']} threads, p90 {model['inference_ms_p90']} ms, "
                f"{model.get('file', 'model file')} ({', '.join(model.get('outputs', []))})",
            )
        )
        if "plain_file_inference_ms_median" in model:
            rows.append(
                (
                    "Model inference, U-Net file alone (S331, S600)",
                    f"{model['plain_file_inference_ms_median']} ms",
                    "median, same conditions",
                )
            )
        if "s300_batch_ms_median" in model:
            rows.append(
                (
                    f"Model inference, a batch of {1 + len(model['zoom_scales'])} "
                    f"(the image and its zoom {model['zoom_scales']}; S300 runs them one by one)",
                    f"{model['s300_batch_ms_median']} ms",
                    "median, same conditions",
                )
            )
    for process, entry in results.get("memory", {}).get("processes", {}).items():
        rows.append((f"Peak RSS, {process}", f"{entry['peak_mb']} MB", f"during {entry['during']}"))
    head = (
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
        f"{m['os']}, Python {m['python']}, commit {m['commit']}; load average "
        f"{m['load_average_at_start'][0]} at start, "
        f"{m.get('load_average_at_end', ['?'])[0]} at end."
    )
    lines = [head, "", "| Measure | Result | Conditions |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50, help="images per intake run")
    parser.add_argument("--repeats", type=int, default=3, help="intake runs per receiver")
    parser.add_argument("--studies", type=int, default=20, help="studies per end-to-end case")
    parser.add_argument("--quiet", type=float, default=0.5, help="node study_quiet_seconds")
    parser.add_argument("--workers", type=int, default=1, help="node analysis_workers")
    parser.add_argument("--pipeline-runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.studies, args.pipeline_runs = 10, 1, 8, 2
    results = run(args)
    results["arguments"] = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time the shipped lesion model: ONNX inference at the working size on this machine.

    python bench/bench_model.py [--model-dir models] [--runs 30] [--threads 2]

Prints one JSON object: the model, its working size, the median and 90th-percentile
milliseconds of one image (batch 1) after warm-up, and of S100+S200 preprocessing of a
2048² 16-bit image to the working size. The budget is 150 ms for inference. A model with
S300 zoom scales (``operating_point.zoom_scales``) also times the image and its zoomed views
in one batch; S300 runs them one at a time (the pipeline bench times that step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.training.preprocess import prepare  # noqa: E402

BUDGET_MS = 150.0


def _times(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _time(
    args: argparse.Namespace, file: str, outputs: list[str], image: np.ndarray
) -> list[float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(args.model_dir / file), options, providers=["CPUExecutionProvider"]
    )
    for _ in range(3):
        session.run(outputs, {"image": image})
    return _times(lambda: session.run(outputs, {"image": image}), args.runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    h, w = manifest["input"]["height"], manifest["input"]["width"]
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, h, w), dtype=np.float32)
    # S300's run: every output the pipeline reads there (with a box head, from its file);
    # a model whose head has a file of its own also times its plain file, which S331 and
    # S600 run for probabilities alone.
    plain = (manifest["file"], [manifest["output"]["name"]])
    runs = {"s300": plain}
    box = manifest.get("box_output")
    if box is not None:
        names = [manifest["output"]["name"], box["name"]]
        runs["s300"] = (box.get("file", manifest["file"]), names)
        if "file" in box:
            runs["plain"] = plain
    times = {name: _time(args, file, outputs, image) for name, (file, outputs) in runs.items()}
    zoom_scales = manifest.get("operating_point", {}).get("zoom_scales", [])
    if zoom_scales:  # S300 runs one view at a time; timed here as a batch of them, too
        batch = rng.random((1 + len(zoom_scales), 1, h, w), dtype=np.float32)
        times["s300_batch"] = _time(args, *runs["s300"], batch)
    infer = times["s300"]
    raw = rng.integers(0, 4096, size=(2048, 2048), dtype=np.uint16)
    prep = _times(lambda: prepare(raw, h, w), max(3, args.runs // 5))
    result = {
        "model": f"{manifest['name']} {manifest['version']}",
        "working_size": [h, w],
        "file": runs["s300"][0],
        "outputs": runs["s300"][1],
        "threads": args.threads,
        "inference_ms_median": round(statistics.median(infer), 1),
        "inference_ms_p90": round(sorted(infer)[int(0.9 * (len(infer) - 1))], 1),
        "preprocess_2048_ms_median": round(statistics.median(prep), 1),
        **(
            {"plain_file_inference_ms_median": round(statistics.median(times["plain"]), 1)}
            if "plain" in times
            else {}
        ),
        **(
            {
                "zoom_scales": zoom_scales,
                "s300_batch_ms_median": round(statistics.median(times["s300_batch"]), 1),
            }
            if "s300_batch" in times
            else {}
        ),
        "budget_ms": BUDGET_MS,
        "within_budget": statistics.median(infer) < BUDGET_MS,
    }
    print(json.dumps(result))
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())

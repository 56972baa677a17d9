"""Latency of one image and throughput at batch 1 and 32: torch eager (Detector.score),
onnxruntime (the exported graph) and the HTTP endpoint (``mlflow models serve``), side by
side in one run on 900x900 PNGs, same threads; plus ONNX-vs-torch equality on real images.

    .venv/bin/python bench/latency.py --data /work/shared/devdata/visa --category fryum

Fits a model on ``--n-train`` train images (default configuration), exports it, scores
``--n-test`` test images both ways (scores, maps, verdicts), then times each way. The
PNGs are the test images resized to 900 x 900 and encoded in memory (nothing is written
to the repository). The endpoint runs on 127.0.0.1 from a temporary MLflow store and is
stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import machine_summary  # noqa: E402
from gaussian_ad.config import DetectorConfig, LoaderOptions  # noqa: E402
from gaussian_ad.data.images import mvtec_manifest  # noqa: E402
from gaussian_ad.detection.detector import Detector  # noqa: E402
from gaussian_ad.export.onnx import export_onnx  # noqa: E402
from gaussian_ad.export.runtime import OnnxDetector  # noqa: E402
from gaussian_ad.features.extract import decode_resized  # noqa: E402


def timed(call, repeats: int) -> np.ndarray:
    call()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return np.array(times)


def row(name: str, times: np.ndarray, batch: int) -> str:
    p50, p99 = np.percentile(times, 50) * 1e3, np.percentile(times, 99) * 1e3
    return f"| {name} | {batch} | {p50:.1f} | {p99:.1f} | {batch / np.median(times):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/devdata/visa")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_summary())
    records = mvtec_manifest(args.data, args.category)
    train = [r.path for r in records if r.split == "train"][: args.n_train]
    test_records = [r for r in records if r.split == "test"]
    step = max(1, len(test_records) // args.n_test)
    test = [r.path for r in test_records[::step]][: args.n_test]
    detector = Detector(DetectorConfig(), LoaderOptions(device="cpu", batch_size=32))
    detector.fit(train)
    tmp = Path(tempfile.mkdtemp(prefix="latency-"))
    result = export_onnx(detector, tmp / "model.onnx", check_images=train[:2])
    print(f"exported {result.size_bytes / 1e6:.1f} MB; self-check {result.check.errors}")
    onnx = OnnxDetector(result.path, threads=args.threads)

    # Equality on real images.
    want = detector.score(test, maps=True)
    size = detector.config.image_size
    pixels = np.stack([decode_resized(p, size) for p in test])
    got = onnx.score_pixels(pixels)
    out = dict(
        zip(
            [o.name for o in onnx.session.get_outputs()],
            onnx.session.run(None, {"pixels": pixels}),
            strict=True,
        )
    )

    def rel(a, b):
        b = np.asarray(b, np.float64)
        return float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.maximum(np.abs(b), 1.0)))

    map_err = np.max(
        np.abs(out["map"] - want.maps).max(axis=(1, 2)) / np.abs(want.maps).max(axis=(1, 2))
    )
    print(
        f"ONNX vs torch on {len(test)} {args.category} test images: score "
        f"{rel(got.scores, want.scores):.2g}, "
        f"image_score {rel(got.image_scores, want.image_scores):.2g}, patch_score "
        f"{rel(got.patch_scores, want.patch_scores):.2g} (relative to max(|x|, 1)), maps "
        f"{map_err:.2g} (relative to each map's peak); is_anomaly identical: "
        f"{bool(np.array_equal(got.is_anomaly, want.is_anomaly))} "
        f"({int(want.is_anomaly.sum())} flagged)"
    )

    # 900x900 PNGs, in memory.
    pngs = []
    for path in test:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((900, 900), Image.Resampling.BILINEAR).save(
            buffer, "PNG"
        )
        pngs.append(buffer.getvalue())
    print(f"PNG 900x900: {np.mean([len(p) for p in pngs]) / 1e6:.2f} MB on average")
    one = pixels[:1]
    batch32 = np.concatenate([pixels] * (32 // len(pixels) + 1))[:32]
    r = args.repeats
    rows = [
        row("torch eager, model (pixels in)", timed(lambda: detector.score(list(one)), r), 1),
        row("onnxruntime, model (pixels in)", timed(lambda: onnx.score_pixels(one), r), 1),
        row("torch eager, PNG decode + model", timed(lambda: detector.score(pngs[:1]), r), 1),
        row("onnxruntime, PNG decode + model", timed(lambda: onnx.score(pngs[:1]), r), 1),
        row("torch eager, model (pixels in)", timed(lambda: detector.score(list(batch32)), 3), 32),
        row("onnxruntime, model (pixels in)", timed(lambda: onnx.score_pixels(batch32), 3), 32),
    ]
    rows += endpoint_rows(detector, result.path, pngs, tmp, args.threads, r)
    print("| way | batch | p50 ms | p99 ms | images/s |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def endpoint_rows(detector, onnx_path, pngs, tmp: Path, threads: int, repeats: int) -> list[str]:
    """The endpoint: the model logged in a temporary store, ``mlflow models serve``."""
    import mlflow

    from gaussian_ad.registry.mlflow_model import log_detector
    from tests.services import BIN, free_port, running, start, wait_http

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(
        experiment_id=mlflow.create_experiment("latency", artifact_location=str(tmp / "artifacts"))
    )
    with mlflow.start_run():
        info = log_detector(detector, "latency", onnx_check=[])
    port = free_port()
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": str(threads),
    }
    command = [str(BIN / "mlflow"), "models", "serve", "-m", info.model_uri, "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = tmp / "serve.log"
    url = f"http://127.0.0.1:{port}/invocations"
    encoded = [base64.b64encode(p).decode() for p in pngs]

    def post(images: list[str]) -> None:
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
        )
        request = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            predictions = json.loads(response.read())["predictions"]
        assert all(p["error"] == "" for p in predictions), predictions

    batch32 = (encoded * 2)[:32]
    with running(start(command, log, env)) as process:
        wait_http(f"http://127.0.0.1:{port}/ping", process, log, timeout=600)
        single = timed(lambda: post(encoded[:1]), repeats)
        many = timed(lambda: post(batch32), 3)
    return [
        row("HTTP endpoint, PNG base64 (decode + onnxruntime)", single, 1),
        row("HTTP endpoint, PNG base64 (decode + onnxruntime)", many, 32),
    ]


if __name__ == "__main__":
    main()

"""How fast ``autoft-data check`` verifies images, and what a full check of iWildCam v2.0 costs.

Writes ``--n`` 1920x1080 JPEGs (quality 90) like camera-trap frames: crops of scikit-learn's two
sample photos, flipped, brightened or darkened, upscaled, with sensor-like noise. Then times
:func:`autoft.imagecheck.scan` (header check + full decode of each file) with 1 thread and with
``--threads`` threads, and a process pool of as many processes for comparison, each over the same
files (read once before, so the page cache holds them: the figure is decode speed, not disk speed).
Prints the figures and writes them to ``--out`` (JSON), with the extrapolation to iWildCam's 203,029
images on 16 cores at the one-thread rate per CPU second (a busy machine lends a process part of a core;
linear scaling assumed: the measured 2-thread speed-up and CPU use say how well that holds here).

    .venv/bin/python benchmarks/datacheck_rate.py --n 200 --threads 2 \
        --out benchmarks/results/2026-11-30-cpu/datacheck-rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from autoft import atomic_write

IWILDCAM_IMAGES = 203_029  # iWildCam v2.0: train 129,809 + id_val 7,314 + id_test 8,154 + val 14,961 + test 42,791


def write_frames(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = photo[top: top + 3 * h // 4, left: left + 3 * w // 4]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        frame = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((1920, 1080), Image.BICUBIC), np.float32)
        frame = frame * rng.uniform(0.6, 1.2) + rng.normal(0, 3, frame.shape)
        path = folder / f"frame{i:04d}.jpg"
        Image.fromarray(frame.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _verify_all(paths: list[str]) -> int:
    from autoft.imagecheck import verify_file

    return sum(verify_file(p) is not None for p in paths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="JPEGs to write and check")
    p.add_argument("--threads", type=int, default=2, help="threads (and processes) of the parallel runs")
    p.add_argument("--cores", type=int, default=16, help="cores of the extrapolation")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = p.parse_args()
    from autoft.imagecheck import file_items, scan

    load = os.getloadavg()  # others' work on a shared machine slows the figures

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_frames(Path(tmp), args.n)
        size = sum(p.stat().st_size for p in paths) / len(paths)
        for path in paths:  # into the page cache: time decoding, not the disk
            path.read_bytes()
        items = file_items(paths)
        rates, cpu_per_wall, per_cpu_second = {}, {}, {}
        for label, workers in (("1 thread", 1), (f"{args.threads} threads", args.threads)):
            t0, c0 = time.perf_counter(), time.process_time()
            bad = scan(items, workers=workers, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates[label], cpu_per_wall[label], per_cpu_second[label] = len(items) / wall, cpu / wall, len(items) / cpu
            assert not bad, bad
        chunks = [[str(q) for q in paths[i::args.threads]] for i in range(args.threads)]
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.threads) as pool:
            assert sum(pool.map(_verify_all, chunks)) == 0
        rates[f"{args.threads} processes"] = len(items) / (time.perf_counter() - t0)
    # a busy machine lends this process a fraction of a core: images per CPU second is the rate of a core
    # of its own (the 1-thread CPU seconds include the thread pool's small overhead)
    per_core = per_cpu_second["1 thread"]
    seconds = IWILDCAM_IMAGES / (per_core * args.cores)
    result = {
        "what": "autoft.imagecheck.verify_file (Image.verify + full Image.load) on 1920x1080 JPEGs, quality 90",
        "images": args.n, "mean_file_kb": round(size / 1024, 1), "images_per_s": {k: round(v, 1) for k, v in
                                                                                 rates.items()},
        "images_per_cpu_second": {k: round(v, 1) for k, v in per_cpu_second.items()},
        "speedup_threads": round(rates[f"{args.threads} threads"] / rates["1 thread"], 2),
        # CPU seconds of this process per wall second: near the thread count when the threads decode in
        # parallel (PIL releases the GIL), near 1 when they wait for each other or for a busy machine
        "cpu_per_wall": {k: round(v, 2) for k, v in cpu_per_wall.items()},
        "load_average_before": [round(x, 2) for x in load],
        "extrapolation": {"images": IWILDCAM_IMAGES, "cores": args.cores,
                          "assumes": "each core decodes at the 1-thread images_per_cpu_second (linear scaling)",
                          "seconds": round(seconds), "minutes": round(seconds / 60, 1)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pillow": Image.__version__},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

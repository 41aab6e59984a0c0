"""How long an offline run takes to say that OpenAI's weights are missing (no network, HF_HUB_OFFLINE unset).

Three timings, each with an empty Hugging Face cache (``HF_HOME`` in a temporary folder) and
``HF_HUB_OFFLINE`` removed from the environment, as a new user's machine would be:

* ``load_clip``: ``autoft.model.load_clip('ViT-B-16', 'openai')`` in this process, to its UserError;
* ``command``: ``python -m autoft.finetune dataset=iwildcam model=vit_b16`` on a tiny iWildCam v2.0 folder
  (written here), start to exit, with its exit status and stderr's ``error:`` lines. The command
  answers from :mod:`autoft.preflight` before importing the training stack; ``imports`` is
  ``python -c "import autoft.finetune"``, Python starting and importing torch, Lightning, wilds and
  open_clip: what the command took when its check came after them. Each with its CPU seconds
  (user + system), which is about what it takes on a quiet machine when the wall time of a shared
  one is not;
* ``--baseline``: open_clip's own ``create_model_and_transforms('ViT-B-16', pretrained='openai')``, which
  retries the hub before it fails (what a run did before autoft.weights).

Refuses to run where the hub answers (it would download 600 MB). Prints the figures and writes them to
``--out`` (JSON).

    .venv/bin/python benchmarks/offline_weights.py --baseline \
        --out benchmarks/results/2026-11-30-cpu/offline-weights.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from autoft import atomic_write


def write_iwildcam(root: Path) -> None:
    """A 10-image iWildCam v2.0 folder in the published layout (2 per split)."""
    import pandas as pd
    from PIL import Image

    folder = root / "iwildcam_v2.0"
    (folder / "train").mkdir(parents=True)
    rows = [{"split": s, "filename": f"{s}_{i}.jpg", "y": i, "location_remapped": k, "sequence_remapped": 2 * k + i,
             "datetime": "2013-01-01 10:00:00.000"}
            for k, s in enumerate(("train", "id_val", "id_test", "val", "test")) for i in range(2)]
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    pd.DataFrame({"y": [0, 1], "name": ["fox", "deer"]}).to_csv(folder / "categories.csv", index=False)
    (folder / "RELEASE_v2.0.txt").write_text("v2.0")
    for row in rows:
        Image.fromarray(np.full((32, 32, 3), 50 * row["y"], np.uint8)).save(folder / "train" / row["filename"])


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + system: near the wall time of a quiet machine, where the wall
    time of a busy one is not) and the finished process."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", action="store_true", help="also time open_clip's own offline failure (~1 min)")
    p.add_argument("--repeat", type=int, default=3, help="runs of the command and of the imports")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = p.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ["HF_HOME"] = str(tmp / "hf")  # before huggingface_hub is imported: an empty cache
        env = dict(os.environ)
        from autoft.weights import hub_reachable

        if hub_reachable():
            sys.exit("the Hugging Face hub answers from here: this measures a machine without network")
        from autoft import UserError
        from autoft.model import load_clip

        t0 = time.perf_counter()
        try:
            load_clip("ViT-B-16", "openai")
            sys.exit("the weights loaded: nothing to measure")
        except UserError as e:
            load_s, message = time.perf_counter() - t0, str(e)
        write_iwildcam(tmp / "data")
        command = [sys.executable, "-m", "autoft.finetune", "dataset=iwildcam", f"dataset.root={tmp / 'data'}",
                   "model=vit_b16", "logger=csv"]
        runs, imports = [], []
        for i in range(args.repeat):
            seconds, cpu, proc = timed([*command, f"hydra.run.dir={tmp / f'run{i}'}"], env)
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            runs.append({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "exit": proc.returncode,
                         "error_lines": len(errors), "traceback": "Traceback" in proc.stderr})
            seconds, cpu, _ = timed([sys.executable, "-c", "import autoft.finetune"], env)
            imports.append({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)})
        result = {"load_clip_seconds": round(load_s, 3), "message": message,
                  "command": " ".join(command[1:]), "command_runs": runs, "imports": imports}
        if args.baseline:
            code = "import open_clip; open_clip.create_model_and_transforms('ViT-B-16', pretrained='openai')"
            seconds, cpu, proc = timed([sys.executable, "-c", code], env)
            result["baseline_open_clip"] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                            "exit": proc.returncode, "stderr_lines": len(proc.stderr.splitlines())}
    result["load_average_before"] = [round(x, 2) for x in load]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

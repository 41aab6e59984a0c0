"""Throughput of AutoFT's inner loop: training steps, per-trial fixed overhead, and the data path.

Three sections, printed as markdown tables (and written as JSON with ``--out``):

* **steps**: images/s of the training step (the fine-tuner's: forward, objective, backward, closed-form
  norm gradients, fused AdamW; one batch that already sits on the device, so no data loading) for plain
  cross-entropy and for the composite objective: the four norm terms (gradients in closed form,
  as training runs them, and inside autograd for comparison), plus flyp with the text tower frozen
  and trained (eager, also with only the norm gradients compiled: ``model.compile_norm_grads``), and
  all nine terms. Each objective's ratio is to plain CE of the same run and model.
  Random weights (speed does not depend on them).
* **trial**: the embedded world's default search (``python -m autoft.finetune -m search=embedded``, run
  in this process as the basic launcher runs it; the first trial builds, later ones reuse model and
  data), each trial's time split into named phases: Optuna trial, reset, logger, objective, trainer,
  Lightning's set-up, first batch, training steps, batch wait (loader, copy, device transform,
  Lightning's loop), validation, pruning report, teardown, logger finish, results file
  (``benchmarks/trial_overhead.py``; ``--sections trial --out DIR`` writes ``trial-overhead.json`` and
  ``.md``, other sections with it ``throughput.json`` and ``.md``).
* **data**: images/s of the data path on one CPU core: decoding 1920x1080 JPEGs and applying the
  model's eval transform with PIL, against reading the uint8 preprocessing cache and making the
  model's input (random resized crop, normalise) on the device.

Timing (steps): the objectives take turns step by step on one model (a round is one step of each),
``--warmup`` rounds untimed, then ``--steps`` timed rounds; images/s is the batch over the median step
time, and each ratio the median over rounds of that round's CE step time over the objective's (so a
shared machine's load drift cancels). The step is FineTuner's, written out without Lightning's loop.

    python benchmarks/throughput.py                                 # CPU, tiny CLIP
    python benchmarks/throughput.py --threads 1 --sections trial --trials 6 --out DIR   # the trial breakdown
    python benchmarks/throughput.py --device cuda --model vit_b16 [--compile] --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from trial_overhead import bench_trial, markdown

# model key -> open_clip name, conf/model option, classes of the synthetic step benchmark
# (the embedded world's 10; iWildCam's 182 for ViT-B/16)
MODELS = {"tiny": ("autoft-tiny", "tiny_clip", 10), "vit_b16": ("ViT-B-16", "vit_b16", 182)}
NORMS = {"l1init": 0.01, "l2init": 0.01, "l1zero": 1e-4, "l2zero": 1e-4}
OTHERS = {"hinge": 0.1, "entropy": 0.1, "dcm": 0.1}
# name, weights, train_text, norm gradients ("autograd": inside autograd; "closed": closed form, eager unless
# --compile; "compiled": closed form by the compiled function with the model eager, model.compile_norm_grads),
# loss checked before backward (as FineTuner did until the check moved after backward: reading the loss waits
# for the GPU, which then idles while backward is launched)
VARIANTS = [
    ("ce", {"ce": 1.0}, False, "closed", False),
    ("ce + 4 norms", {"ce": 1.0, **NORMS}, False, "closed", False),
    ("ce + 4 norms, inside autograd", {"ce": 1.0, **NORMS}, False, "autograd", False),
    ("ce + 4 norms + flyp, text frozen", {"ce": 1.0, **NORMS, "flyp": 0.5}, False, "closed", False),
    ("ce + 4 norms + flyp, text trained", {"ce": 1.0, **NORMS, "flyp": 0.5}, True, "closed", False),
    ("ce + 4 norms + flyp, text trained, loss checked before backward", {"ce": 1.0, **NORMS, "flyp": 0.5}, True,
     "closed", True),
    ("ce + 4 norms + flyp, text trained, norm gradients compiled", {"ce": 1.0, **NORMS, "flyp": 0.5}, True,
     "compiled", False),
    ("all 9 terms, text trained", {"ce": 1.0, **NORMS, **OTHERS, "flyp": 0.5}, True, "closed", False),
]
log = logging.getLogger("throughput")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):  # reading the loss waits for the GPU
        raise FloatingPointError("non-finite loss")


def training_step(model, objective, optimizer, batch, step: int, device: str, check_first: bool = False) -> None:
    """One step as FineTuner runs it (``training_step``, backward, ``on_before_optimizer_step``, AdamW), with
    Lightning's bf16-mixed autocast on CUDA: norm-term values on logging steps only, the non-finite check
    once backward and the norm gradients are queued (``check_first``: before backward)."""
    x, y, _ = batch
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        feats = model.image_features(x)
        logits = model.head(feats)
        text = model.caption_features(y) if objective.needs_text else None
        loss, _ = objective(logits, y, feats, text, model.logit_scale, norm_values=step % 25 == 0)
    if check_first:
        _check_finite(loss)
    loss.backward()
    objective.add_norm_grads()
    if not check_first:
        _check_finite(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_steps(args) -> list[dict]:
    """images/s of each objective's training step; ratios to plain CE of the same rounds.

    The objectives take turns step by step (one round = one step of each, in a rotating order), on one
    model, so that a shared machine's load changes hit them alike; each has its own optimizer.
    """
    from autoft.model import CLIPClassifier, load_clip
    from autoft.objective import CompositeObjective

    name, _, n_classes = MODELS[args.model]
    torch.manual_seed(0)
    clip, _, _, tokenizer = load_clip(name, None)
    size = clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    classes = [f"species {i}" for i in range(n_classes)]
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = (x, torch.randint(0, n_classes, (args.batch,), device=args.device),
             torch.zeros(args.batch, 1, dtype=torch.long, device=args.device))
    runs = []
    for train_text in (False, True):  # frozen text first: the trained-text classifier unfreezes the shared tower
        model = CLIPClassifier(clip, tokenizer, classes, ["a photo of a {}."], train_text=train_text).to(args.device)
        if args.channels_last:
            model.use_channels_last()
        model.train()
        for label, weights, text, norms, check_first in VARIANTS:
            if text == train_text and not (args.compile and norms == "compiled"):  # --compile: the "closed" row
                compiled = norms == "compiled" or (args.compile and norms == "closed")
                objective = CompositeObjective(weights, model.trainable(), closed_form_norms=norms != "autograd",
                                               compile_norm_grads=compiled)
                params = [p for _, p in model.trainable()]
                fused = {"fused": True} if args.device in ("cuda", "cpu") else {}
                runs.append((label, model, objective, torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, **fused),
                             check_first))
    if args.compile:  # as finetune.build compiles, after the zero-shot head: the image tower, and the text
        clip.visual.compile()  # tower where it is trained (here for all: frozen, it runs once, without grad)
        clip.transformer.compile()
    order = {label: i for i, (label, *_) in enumerate(VARIANTS)}
    runs.sort(key=lambda r: order[r[0]])
    times: dict[str, list[float]] = {label: [] for label, *_ in runs}
    for step in range(args.warmup + args.steps):
        shift = step % len(runs)
        for label, model, objective, optimizer, check_first in runs[shift:] + runs[:shift]:
            _sync(args.device)
            t0 = time.perf_counter()
            training_step(model, objective, optimizer, batch, step, args.device, check_first)
            _sync(args.device)
            if step >= args.warmup:
                times[label].append(time.perf_counter() - t0)
        if step >= args.warmup and (step - args.warmup) % 10 == 9:
            log.info("step %d: %s", step, {k: round(args.batch / statistics.median(v), 1) for k, v in times.items()})
    base = times[runs[0][0]]
    rows = [{"objective": label, "images_per_s": args.batch / statistics.median(t),
             "ratio_to_ce": statistics.median(b / a for a, b in zip(t, base, strict=True))}
            for label, t in times.items()]
    if args.profile:
        for row, run in zip(rows, runs, strict=True):
            row.update(profile_step(args, batch, *run[1:]))
    return rows


def profile_step(args, batch, model, objective, optimizer, check_first: bool) -> dict:
    """``args.profile`` steps of one objective under torch.profiler: wall ms per step and, on CUDA, the ms
    the GPU spends in kernels (the rest of the wall time it waits on the CPU), with the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    _sync(args.device)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(args.profile):
            training_step(model, objective, optimizer, batch, 1 + i, args.device, check_first)  # no norm values
        _sync(args.device)
        wall = (time.perf_counter() - t0) / args.profile
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {"wall_ms": wall * 1e3, "top": events.table(sort_by=key, row_limit=10)}
    if cuda:
        out["kernel_ms"] = sum(e.self_device_time_total for e in events) / 1e3 / args.profile
    return out


class Files(Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.open(self.paths[i]).convert("RGB")


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 1920x1080 JPEGs (quality 90) of smooth random scenes with noise, like camera-trap frames."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)).resize((1920, 1080),
                                                                                          Image.BILINEAR)
        noisy = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (1080, 1920, 3), dtype=np.int16)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def bench_data(args, tmp: Path) -> list[dict]:
    """JPEG decode + the eval transform with PIL, vs the uint8 cache to the model's input, one core each."""
    from autoft.imagecache import CachedImages, _batch, image_cache
    from autoft.model import load_clip
    from autoft.tensorprep import eval_prep, model_input, train_prep

    torch.set_num_threads(1)
    name = MODELS[args.model][0]
    _, train_tf, eval_tf, _ = load_clip(name, None)
    paths = write_jpegs(tmp / "jpegs", args.jpegs)
    files = Files(paths)
    t0 = time.perf_counter()
    for i in range(len(files)):
        eval_tf(files[i])
    jpeg = len(files) / (time.perf_counter() - t0)
    os.environ["AUTOFT_CACHE"] = str(tmp / "cache")  # a throwaway cache
    prep = eval_prep(eval_tf)
    t0 = time.perf_counter()
    path = image_cache("jpegs", {"folder": str(tmp / "jpegs")}, files, prep)
    build = len(files) / (time.perf_counter() - t0)
    cached = CachedImages(path, np.arange(len(files)), torch.zeros(len(files), dtype=torch.long),
                          torch.zeros(len(files), 1, dtype=torch.long))
    tprep = train_prep(train_tf, prep, cached.image_size)
    loader = DataLoader(cached, batch_size=min(args.batch, len(files)), shuffle=True, collate_fn=_batch,
                        pin_memory=args.device == "cuda")
    times, n = [], 0
    for _ in range(max(3, args.repeats)):
        _sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.cache_epochs):
            for x, _y, _meta in loader:
                model_input(x.to(args.device, non_blocking=True), tprep, train=True)
                n += len(x)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    cache = statistics.median(len(files) * args.cache_epochs / t for t in times)
    torch.set_num_threads(args.threads)
    return [{"path": "JPEG 1920x1080: decode + eval transform (PIL)", "images_per_s": jpeg},
            {"path": "cache build (decode + resize once, written to the memory map)", "images_per_s": build},
            {"path": f"uint8 cache -> model input on {args.device} (crop, normalise)", "images_per_s": cache,
             "ratio_to_jpeg": cache / jpeg}]


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    out = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(format(r[c[0]], c[2]) if c[0] in r else "" for c in columns) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=tuple(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=30, help="timed steps per objective (rounds)")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    p.add_argument("--batch", type=int, default=None, help="step-benchmark batch (default: 128 tiny, 256 vit_b16)")
    p.add_argument("--repeats", type=int, default=3, help="data-path timing repeats")
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--trials", type=int, default=3, help="search trials in one process (the first builds)")
    p.add_argument("--trial-override", action="append", default=[], help="extra Hydra override for the trials")
    p.add_argument("--logger", default="wandb", help="trials' logger: wandb (the search's default, offline), or csv")
    p.add_argument("--jpegs", type=int, default=200)
    p.add_argument("--cache-epochs", type=int, default=20)
    p.add_argument("--sections", default="steps,trial,data")
    p.add_argument("--profile", type=int, default=0,
                   help="then profile this many steps of each objective (wall vs GPU kernel time, top kernels)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads (1 gives steadier figures on a shared machine)")
    p.add_argument("--out", type=Path, default=None, help="write throughput.json here")
    args = p.parse_args(argv)
    args.batch = args.batch or (128 if args.model == "tiny" else 256)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    os.environ.setdefault("WANDB_MODE", "offline")
    sections = set(args.sections.split(","))
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    head = (f"model {MODELS[args.model][0]}, {device}, torch {torch.__version__}, "
            f"{'compiled' if args.compile else 'eager'}, channels_last {args.channels_last}")
    report: dict = {"setup": head, "args": {k: str(v) for k, v in vars(args).items()}}
    lines = [f"### {head}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if "steps" in sections:
            report["steps"] = bench_steps(args)
            columns = [("objective", "objective", "s"), ("images_per_s", "images/s", ".1f"),
                       ("ratio_to_ce", "x plain CE", ".3f")]
            if args.profile:
                columns += [("wall_ms", "profiled ms/step", ".1f"), ("kernel_ms", "GPU kernels ms/step", ".1f")]
            lines += [f"Training step, batch {args.batch}, objectives interleaved step by step, {args.steps} "
                      f"timed rounds after {args.warmup} warm-up; medians:", "", table(report["steps"], columns), ""]
            if args.profile and args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "profile.txt").write_text("".join(f"## {r['objective']}\n{r.pop('top')}\n"
                                                              for r in report["steps"]))
            for r in report["steps"]:
                r.pop("top", None)
        if "trial" in sections:
            report["trial"] = bench_trial(args, MODELS[args.model][1], Path(tmp) / "trial")
            trial_md = markdown(report["trial"])
            lines += [trial_md]
            if args.out and sections == {"trial"}:  # with other sections it is in throughput.{json,md}
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "trial-overhead.json").write_text(json.dumps(report["trial"] | {"setup": head}, indent=1))
                (args.out / "trial-overhead.md").write_text(f"### {head}\n\n{trial_md}")
        if "data" in sections:
            report["data"] = bench_data(args, Path(tmp))
            lines += [f"Data path, one CPU core, {args.jpegs} images:", "",
                      table(report["data"], [("path", "path", "s"), ("images_per_s", "images/s", ".1f"),
                                             ("ratio_to_jpeg", "x JPEG", ".1f")]), ""]
    text = "\n".join(lines)
    print(text)
    if args.out and sections != {"trial"}:  # the trial section alone writes trial-overhead.{json,md}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
        (args.out / "throughput.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

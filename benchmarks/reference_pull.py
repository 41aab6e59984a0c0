"""The per-element pull of each norm term of a published objective, measured on the model's gradients.

    python benchmarks/reference_pull.py [--model vit_b16] [--objective autoft_iwildcam] [--classes 182]

Builds the classifier the config asks for (open_clip architecture with random weights: the count and the
pull do not depend on the weights' values, and none are downloaded), the objective that finetune() builds
(autoft.conventions.objective_settings), moves every parameter away from theta0, and for each norm term alone
reads the gradient it adds to every element, in closed form (what training uses) and through autograd. The
pull is |g| for l1init and l1zero (|sign| = 1), g / (2 (p - p0)) for l2init and g / (2 p) for l2zero; under
the reference convention it must equal weight / N for every element, N the model's parameter count. Prints a
table, writes JSON (default benchmarks/results/2026-11-30-cpu/reference-pull.json) and exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from autoft import atomic_write
from autoft.conventions import model_parameter_count, objective_settings, parameter_count
from autoft.finetune import CONF_DIR
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import NORM_TERMS, CompositeObjective

OUT = Path(__file__).parent / "results" / "2026-11-30-cpu" / "reference-pull.json"
RTOL = 1e-6  # float32 gradients


def measured_pulls(model: CLIPClassifier, objective: CompositeObjective, term: str, theta0: list[torch.Tensor]
                   ) -> tuple[float, float]:
    """(min, max) over every element of the pull ``term``'s gradient implies."""
    lo, hi = float("inf"), 0.0
    for p, q in zip(objective.params, theta0, strict=True):
        g = p.grad.double()
        base = {"l1init": None, "l1zero": None, "l2init": 2 * (p.detach().double() - q.double()),
                "l2zero": 2 * p.detach().double()}[term]
        pull = g.abs() if base is None else g / base
        lo, hi = min(lo, pull.min().item()), max(hi, pull.max().item())
    return lo, hi


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b16", help="conf/model option")
    parser.add_argument("--objective", default="autoft_iwildcam", help="conf/objective option")
    parser.add_argument("--classes", type=int, default=182, help="the head's classes (iWildCam: 182)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[f"model={args.model}", f"objective={args.objective}"])
    t0 = time.time()
    torch.manual_seed(0)
    clip, _, _, tokenizer = load_clip(cfg.model.name, None)
    model = CLIPClassifier(clip, tokenizer, [f"class {i}" for i in range(args.classes)], ["a photo of {}."],
                           train_text=cfg.model.train_text, train_logit_scale=cfg.model.get("train_logit_scale", False),
                           captions=cfg.model.get("captions", "first"))
    settings = objective_settings(cfg, model)
    n = parameter_count(model)
    weights = {t: float(cfg.objective.weights[t]) for t in NORM_TERMS}
    rows, ok = [], True
    for term in NORM_TERMS:
        row = {"term": term, "weight": weights[term], "expected_pull": weights[term] / n}
        for path in ("closed", "autograd"):
            objective = CompositeObjective({"ce": 0.0, term: weights[term]}, model.trainable(),
                                           closed_form_norms=path == "closed", **settings)
            theta0 = [p.detach().clone() for p in objective.params]
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():  # every element away from theta0 (and from 0), by +-1e-3
                for p in objective.params:
                    p.add_(1e-3 * (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype))
                    p.grad = None
            if path == "closed":
                objective.add_norm_grads()
            else:
                total, _ = objective(torch.zeros(1, 2, requires_grad=True), torch.zeros(1, dtype=torch.long))
                total.backward()
            lo, hi = measured_pulls(model, objective, term, theta0)
            error = max(abs(lo - row["expected_pull"]), abs(hi - row["expected_pull"])) / row["expected_pull"]
            row[path] = {"min_pull": lo, "max_pull": hi, "max_relative_error": error}
            ok &= error <= RTOL
            with torch.no_grad():  # back to the start for the next term
                for p, q in zip(objective.params, theta0, strict=True):
                    p.copy_(q)
                    p.grad = None
        row["ours_pull_at_norm_scale_1"] = weights[term]
        rows.append(row)
    result = {
        "model": cfg.model.name, "objective": args.objective, "convention": settings["convention"],
        "classes": args.classes, "parameter_count": n,
        "parameter_count_from_config": model_parameter_count(cfg.model, args.classes),
        "trainable": sum(p.numel() for _, p in model.trainable()), "tolerance": RTOL, "ok": ok,
        "terms": rows, "seconds": round(time.time() - t0, 1),
        "note": "random weights (open_clip architecture, pretrained=None); the pull depends only on the weights "
                "given and the parameter count",
    }
    print(f"{cfg.model.name}, {args.classes} classes: N = {n:,} parameters ({result['trainable']:,} trainable); "
          f"objective={args.objective} ({settings['convention']} convention)")
    print(f"{'term':8} {'weight':>12} {'weight / N':>12} {'closed form min..max':>27} {'autograd min..max':>27}")
    for r in rows:
        print(f"{r['term']:8} {r['weight']:12.6g} {r['expected_pull']:12.6g} "
              f"{r['closed']['min_pull']:13.6g}..{r['closed']['max_pull']:<13.6g}"
              f"{r['autograd']['min_pull']:13.6g}..{r['autograd']['max_pull']:<13.6g}")
    print("every element's pull equals weight / N" if ok else f"MISMATCH beyond relative {RTOL}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Robust counts of a trained mixture under dvtrain's ensemble attack, margin PGD and APGD-CE, on the same images.

    python launch/ensemble_attack_check.py RUN_DIR STAGE [--split train|test] [--n N] [KEY=VALUE ...]

KEY=VALUE override fields of eval.adaptive (e.g. inverse_temperature=0.5 "blend_scales=[0.5,1.0]"): this is how
the attack's settings are chosen on TRAINING images (--split train, the default) before it is run once
on the test images (docs/evaluation.md, "The ensemble attack"). L∞ at the run's eval.eps. Prints one
line per attack: robust images / n and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import yaml

import dvtrain
from dvtrain.attacks import pgd_linf
from dvtrain.config import AutoAttackConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.eval.adaptive import adaptive_linf
from dvtrain.eval.autoattack import autoattack_robust
from dvtrain.mixture import Mixture
from dvtrain.rng import stream

MARGIN_PGD_STEPS, MARGIN_PGD_STEP_FRACTION, MARGIN_PGD_RESTARTS = 100, 0.25, 5  # a long margin PGD


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir"); ap.add_argument("stage")
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--n", type=int, default=359, help="the split's first N images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated: pgd,apgd")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    cfg = load_config(f"{a.run_dir}/config.yaml", [f"eval.adaptive.{o}" for o in a.overrides])
    data = load_dataset(cfg.data)
    x, y = (data.x_train, data.y_train) if a.split == "train" else (data.x_test, data.y_test)
    x, y = x[: a.n], y[: a.n]
    submodels = dvtrain.load_submodels(a.run_dir, a.stage)
    mixture = Mixture(submodels).eval()
    eps = cfg.eval.eps

    def count(adv: torch.Tensor) -> int:
        assert float((adv - x).abs().max()) <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            return int((mixture(adv).argmax(1) == y).sum())

    def report(name: str, robust: int, start: float) -> None:
        print(f"{a.stage} {a.split}[:{len(y)}] eps={eps:g} {name}: {robust} robust ({time.time() - start:.0f} s)", flush=True)

    report("clean", count(x), time.time())
    if "pgd" not in a.skip:
        start, still = time.time(), torch.ones(len(y), dtype=torch.bool)
        g = stream(a.seed, "check", "pgd")
        for _ in range(MARGIN_PGD_RESTARTS):
            adv = pgd_linf(mixture, x, y, eps, MARGIN_PGD_STEP_FRACTION * eps, MARGIN_PGD_STEPS, True, g, loss="cw")
            with torch.no_grad():
                still &= mixture(adv).argmax(1) == y
        report(f"margin PGD ({MARGIN_PGD_STEPS} steps of ε/4, {MARGIN_PGD_RESTARTS} restarts)", int(still.sum()), start)
    if "apgd" not in a.skip:
        start = time.time()
        robust = autoattack_robust(mixture, x, y, "Linf", eps, AutoAttackConfig(version="custom", attacks=["apgd-ce"]),
                                   a.seed, 500)
        report("APGD-CE (pyautoattack, 100 iterations)", int(robust.sum()), start)
    start = time.time()
    adv = adaptive_linf(submodels, x, y, eps, cfg.eval.adaptive, stream(a.seed, "check", "adaptive"))
    report(f"ensemble attack {yaml.safe_dump(dataclasses.asdict(cfg.eval.adaptive), default_flow_style=True).strip()}",
           count(adv), start)


if __name__ == "__main__":
    main()

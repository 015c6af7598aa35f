"""A developer's check of the ensemble attack's settings: how many images of a trained mixture stay robust
under dvtrain's ensemble attack (`dvtrain.eval.attacks.adaptive`), a long margin PGD and pyautoattack's APGD-CE,
on the same images, at the run's eval.eps (L∞, pixels in [0, 1]).

    python -m dvtrain.eval.ensemble_attack_check RUN_DIR STAGE [--split train|test] [--n N] [--seed S]
        [--skip pgd,apgd] [KEY=VALUE ...]

KEY=VALUE overrides a field of eval.adaptive (e.g. inverse_temperature=0.5 "blend_scales=[0.5,1.0]"). The
attack's settings are chosen this way on TRAINING images (--split train, the default) and only then run
once on the test images (docs/evaluation.md, "The ensemble attack"). Prints one line per attack: the
robust images of the split's first N and the seconds it took. Not a user command: `dvtrain eval` runs
the ensemble attack with the configured settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import yaml

from dvtrain.attacks import pgd_linf
from dvtrain.config import AutoAttackConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.errors import DvtrainError
from dvtrain.eval.attacks.adaptive import adaptive_linf
from dvtrain.eval.attacks.autoattack import autoattack_robust
from dvtrain.eval.load import load_submodels
from dvtrain.mixture import Mixture
from dvtrain.rng import stream
from dvtrain.rundir import RunDir

# A long margin PGD (Carlini & Wagner's margin loss): 100 steps of ε/4 from 5 random starts.
MARGIN_PGD_STEPS, MARGIN_PGD_STEP_FRACTION, MARGIN_PGD_RESTARTS = 100, 0.25, 5
APGD_BATCH_SIZE = 500  # images per pyautoattack batch (memory only); docs/evaluation.md's counts used it
DEFAULT_IMAGES = 359  # the digits test split's size: the docs' counts are over all of it
from dvtrain.exits import EXIT_USER_ERROR


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dvtrain.eval.ensemble_attack_check",
                                 description="Robust images of a trained mixture under the ensemble attack, a long "
                                             "margin PGD and APGD-CE, on the same images (L∞ at the run's eval.eps).")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a run directory `dvtrain train` wrote")
    ap.add_argument("stage", metavar="STAGE", help="a finished stage of that run, e.g. dverge")
    ap.add_argument("--split", choices=["train", "test"], default="train",
                    help="images to attack (default: train; choose settings on training images only)")
    ap.add_argument("--n", type=int, default=DEFAULT_IMAGES, help="the split's first N images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the attacks' random draws")
    ap.add_argument("--skip", default="", help="comma-separated attacks not to run: pgd, apgd")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="eval.adaptive overrides, e.g. steps=100")
    return ap


def robust_count(mixture: Mixture, adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float) -> int:
    """Images of adv [N, C, H, W] the mixture still classifies as y [N]; raises RuntimeError if an image
    left the L∞ ball of radius eps around x or the pixel range [0, 1] (an attack bug, not robustness)."""
    if float((adv - x).abs().max()) > eps + 1e-6 or adv.min() < 0 or adv.max() > 1:
        raise RuntimeError(f"an adversarial image leaves the L∞ ball of ε={eps:g} or [0, 1]")
    with torch.no_grad():
        return int((mixture(adv).argmax(1) == y).sum())


def check(args: argparse.Namespace) -> None:
    """Run the attacks of `args` (see `parser`) and print one line per attack."""
    cfg = load_config(RunDir(args.run_dir).config, [f"eval.adaptive.{o}" for o in args.overrides])
    data = load_dataset(cfg.data)
    x, y = (data.x_train, data.y_train) if args.split == "train" else (data.x_test, data.y_test)
    x, y = x[: args.n], y[: args.n]
    submodels = load_submodels(args.run_dir, args.stage)
    mixture = Mixture(submodels).eval()
    eps = cfg.eval.eps
    skip = set(args.skip.split(","))

    def report(name: str, robust: int, start: float) -> None:
        print(f"{args.stage} {args.split}[:{len(y)}] eps={eps:g} {name}: {robust} robust ({time.time() - start:.0f} s)",
              flush=True)

    report("clean", robust_count(mixture, x, x, y, eps), time.time())
    if "pgd" not in skip:
        start, still = time.time(), torch.ones(len(y), dtype=torch.bool)
        generator = stream(args.seed, "check", "pgd")
        for _ in range(MARGIN_PGD_RESTARTS):  # an image counts as robust only if it survives every start
            adv = pgd_linf(mixture, x, y, eps, MARGIN_PGD_STEP_FRACTION * eps, MARGIN_PGD_STEPS, True, generator, loss="cw")
            with torch.no_grad():
                still &= mixture(adv).argmax(1) == y
        report(f"margin PGD ({MARGIN_PGD_STEPS} steps of ε/4, {MARGIN_PGD_RESTARTS} restarts)", int(still.sum()), start)
    if "apgd" not in skip:
        start = time.time()
        robust = autoattack_robust(mixture, x, y, "Linf", eps, AutoAttackConfig(version="custom", attacks=["apgd-ce"]),
                                   args.seed, APGD_BATCH_SIZE)
        report("APGD-CE (pyautoattack, 100 iterations)", int(robust.sum()), start)
    start = time.time()
    adv = adaptive_linf(submodels, x, y, eps, cfg.eval.adaptive, stream(args.seed, "check", "adaptive"))
    settings = yaml.safe_dump(dataclasses.asdict(cfg.eval.adaptive), default_flow_style=True, width=sys.maxsize).strip()
    report(f"ensemble attack {settings}", robust_count(mixture, adv, x, y, eps), start)


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad run directory, stage or override is one line on stderr and exit status 2."""
    args = parser().parse_intermixed_args(argv)
    try:
        check(args)
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Typed configuration: the single source of every hyperparameter.

A run's configuration is built from the dataclass defaults, then a YAML file, then dotted
``key=value`` overrides from the command line. Every value is type-checked against the dataclass
annotations, so a typo in a key or a value stops the run before any work is done.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dvtrain import stages as stage_registry
from dvtrain.errors import DvtrainError
from dvtrain.paths import read_text
from dvtrain.plugins import TABLES_GROUP, table_settings
from dvtrain.stages import StageSpec, register_built_in

# Choices are Literal types: the validator checks a value against them and lists them in its message.
# (The stages and the attacks are not Literals: they come from registries, `dvtrain.stages` and
# `dvtrain.eval.attacks.registry` / `dvtrain.eval.attacks.transfer`, plug-ins included.)
DatasetName = Literal["digits", "fashion_mnist", "cifar10"]
Arch = Literal["conv", "resnet20"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
BnMode = Literal["train", "eval"]
Engine = Literal["loop", "grouped"]
Precision = Literal["fp32", "bf16"]
Optimizer = Literal["sgd", "adam"]
# The ensemble-diversity baselines the DVERGE paper compares against (dvtrain.train.baselines).
BASELINES = ("adp", "gal", "trs")
DATASETS = typing.get_args(DatasetName)
ARCHS = typing.get_args(Arch)
WANDB_MODES = typing.get_args(WandbMode)
BN_MODES = typing.get_args(BnMode)
ENGINES = typing.get_args(Engine)
PRECISIONS = typing.get_args(Precision)
OPTIMIZERS = typing.get_args(Optimizer)
# Sections renamed so that each stage's section carries the stage's name: old name → new name.
RENAMED_SECTIONS = {"pretrain": "vanilla"}
# Keys that no longer mean anything, with why: older run directories still hold them in config.yaml,
# so they are ignored with a note instead of refused.
RETIRED_KEYS = {
    "eval.transfer.surrogate_size": "eval.transfer.surrogate_sizes (a list: one surrogate ensemble per size)",
    "eval.transfer.apgd_steps": "pyautoattack's APGD-CE replaced dvtrain's own (see eval.autoattack)",
    "eval.transfer.apgd_restarts": "pyautoattack's APGD-CE replaced dvtrain's own (see eval.autoattack)",
    "eval.adaptive.step_fraction": "the ensemble attack follows MORA's cosine step schedule (eval.adaptive.initial_step)",
    "eval.adaptive.confidence": "the ensemble attack reweighs submodels as MORA does, without a margin cap",
    "eval.adaptive.temperature": "the ensemble attack's weights follow MORA's (eval.adaptive.inverse_temperature)",
}


class ConfigError(DvtrainError):
    pass


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (of each item, for a list); None bounds are open-ended."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""  # what the value means, shown in the error message
    nonempty: bool = False  # lists only: at least one item

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        return self.describe()

    def describe(self, value: float | None = None) -> str:
        """The range as the error message shows it. An upper bound that is only the machinery's limit
        (`MACHINE_LIMITS`, e.g. torch's int64) is shown only to a `value` above it: "must be >= 1", not
        "must be in [1, 9223372036854775807]"."""
        low = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">") if self.gt is not None else None
        high = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<") if self.lt is not None else None
        if high and high[0] in MACHINE_LIMITS and type(high[0]) is int and low:
            if value is None or not value > high[0]:
                high = None
            else:
                return f"<= {high[0]} ({MACHINE_LIMITS[high[0]]})"
        if low and high:
            return f"in {low[1]}{_bound(low[0])}, {_bound(high[0])}{high[1]}"
        bound = low or high
        return f"{bound[2]} {_bound(bound[0])}" if bound else "a finite number"


def _bound(value: float) -> str:
    """A bound as the user would type it: integers in full (2**63 - 1, not 9.22337e+18), floats short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def ranged(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, note: str = "", nonempty: bool = False,
           factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its valid range beside it, e.g. `eps: float = ranged(0.03, ge=0, le=1)`.
    None (of an Optional field) is always valid; `validate` checks every other value."""
    metadata = {"range": Range(ge, gt, le, lt, note, nonempty)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Notes shared by several fields' ranges.
PIXELS = "ε in pixel units of images in [0, 1]"
# Upper bounds of integers handed to torch, numpy and the random streams (issue 28, kind 10): counts and sizes
# are int64 in torch; a seed that seeds a torch.Generator directly (data.split_seed) is an unsigned 64-bit
# integer, and the others are kept to the same range; torch.set_num_threads takes a C int; a timeout
# becomes a datetime.timedelta and gloo's milliseconds, and one longer than a year would be a hang.
COUNT_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1
THREADS_MAX = 2**31 - 1
TIMEOUT_MAX_S = 365 * 24 * 3600
MACHINE_LIMITS = {COUNT_MAX: "the largest integer torch takes", SEED_MAX: "the largest seed torch takes",
                  THREADS_MAX: "the most threads torch takes"}


@dataclass
class DataConfig:
    name: DatasetName = "digits"
    root: str = "data"
    # CIFAR-10 only: fetch the archive where there is internet.
    download: bool = False
    # CIFAR-10 only: torchvision's md5 check of the batch files (off for hand-made test files).
    verify_checksums: bool = True
    # Random crop (zero padding) + horizontal flip, done on the device each epoch.
    augment: bool = False
    crop_padding: int = ranged(4, ge=0, le=COUNT_MAX, note="pixels")
    # Skip each epoch's last partial training batch, so every step has the same shapes (needed for
    # compute.cuda_graphs to capture every step; off: every image is used, as the reference does).
    drop_last: bool = False
    # digits only: share of the 1797 images held out; the split is fixed by `split_seed`, not `seed`,
    # so runs with different seeds are scored on the same test images.
    test_fraction: float = ranged(0.2, gt=0, lt=1)
    split_seed: int = ranged(0, ge=0, le=SEED_MAX)
    # 0 keeps everything; a positive number keeps the first N images (quick runs, tests).
    train_limit: int = ranged(0, ge=0, le=COUNT_MAX, note="0 keeps every image")
    test_limit: int = ranged(0, ge=0, le=COUNT_MAX, note="0 keeps every image")


@dataclass
class ModelConfig:
    arch: Arch = "conv"
    # conv only: padding of the two 5x5 convolutions; None picks 2 for inputs below 28 px, else 0.
    conv_padding: Optional[int] = ranged(None, ge=0, le=COUNT_MAX, note="pixels, or null to pick by input size")


@dataclass
class EnsembleConfig:
    size: int = ranged(3, ge=2, le=COUNT_MAX, note="DVERGE needs other submodels")


@dataclass
class OptimConfig:
    """SGD with momentum, or Adam; the learning rate is multiplied by `gamma` at each epoch in `milestones`."""

    name: Optimizer = "sgd"
    lr: float = ranged(1e-3, gt=0)
    momentum: float = ranged(0.9, ge=0, lt=1)  # SGD only (Adam keeps its default betas)
    weight_decay: float = ranged(0.0, ge=0)
    milestones: list[int] = ranged(factory=list, ge=1, le=COUNT_MAX, note="numbers of epochs after which the rate is multiplied by gamma")
    gamma: float = ranged(0.1, gt=0)
    eps: float = ranged(1e-8, gt=0)  # Adam only: added to the denominator


@dataclass
class StageConfig:
    """What the stage loop reads of every stage's section; each stage's section extends it (and may
    redeclare a field with its own default or range). Its fields come first in the section's YAML."""

    epochs: int = ranged(1, ge=0, le=COUNT_MAX)
    batch_size: int = ranged(32, ge=1, le=COUNT_MAX)
    # None: fresh weights; a stage name: start from that stage's final weights.
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class VanillaConfig(StageConfig):
    """The `vanilla` stage: each submodel trained alone on clean data with its own data order; it starts from
    fresh weights (plain pretraining) unless `init_from` names a stage. The rest is StageConfig's."""

    epochs: int = ranged(30, ge=0, le=COUNT_MAX)


@dataclass
class DvergeConfig(StageConfig):
    """A DVERGE stage. Defaults follow the reference code (github zjysteven/DVERGE)."""

    epochs: int = ranged(200, ge=0, le=COUNT_MAX)
    batch_size: int = ranged(128, ge=1, le=COUNT_MAX)
    # Feature distillation: PGD in input space from x_s towards the layer-l features of x.
    eps: float = ranged(0.07, ge=0, le=1, note=PIXELS)
    step_size: float = ranged(0.007, gt=0, note="pixel units")
    steps: int = ranged(10, ge=1, le=COUNT_MAX, note="distillation steps")
    random_start: bool = False
    # Per-sample L1-normalised gradients accumulated with this momentum (reference: 1.0);
    # 0 gives plain sign-gradient PGD.
    momentum: float = ranged(1.0, ge=0)
    # None draws a layer uniformly at random each epoch; an integer fixes it (1-based).
    layer: Optional[int] = ranged(None, ge=1, le=COUNT_MAX, note="layers are 1-based; null draws one each epoch")
    # BatchNorm mode of the distillation forwards: "train" (reference) or "eval".
    bn_mode: BnMode = "train"
    # loss_i = diversity_weight * sum_{j!=i} CE(f_i(x'_j), y_s) + clean_weight * CE(f_i(x), y)
    #          (+ CE(f_i(adv_i), y_s) with plus_adv). Reference: 1 and 0; the report's eq. 4: α and 1.
    diversity_weight: float = ranged(1.0, ge=0)
    clean_weight: float = ranged(0.0, ge=0)
    # DVERGE+AdvT: also train each submodel on its own PGD-L∞ adversarial examples.
    plus_adv: bool = False
    adv_eps: float = ranged(8 / 255, ge=0, le=1, note=PIXELS)
    adv_step_size: float = ranged(2 / 255, gt=0, note="pixel units")
    adv_steps: int = ranged(10, ge=1, le=COUNT_MAX)
    # How the owned submodels' distillation and diversity gradients are computed (see dvtrain.train.engines).
    engine: Engine = "loop"
    # Which stage's final weights this stage starts from.
    init_from: str = "vanilla"
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, milestones=[100, 150])
    )


def _baseline_adam(milestones: list[int]) -> OptimConfig:
    """The optimizer of the ADP, GAL and TRS reference trainers: Adam, lr 1e-3, weight decay 1e-4, eps 1e-7
    (zjysteven/DVERGE train/train_adp.py and train_gal.py; AI-secure/Transferability-Reduced-Smooth-Ensemble
    train/Empirical/train_trs.py), with step decay ×0.1."""
    return OptimConfig(name="adam", lr=1e-3, weight_decay=1e-4, eps=1e-7, milestones=milestones, gamma=0.1)


@dataclass
class AdpConfig(StageConfig):
    """ADP (Pang et al., ICML 2019): Σ_i CE_i − α·H(mean prediction) − β·log det(Gram of the normalised
    non-true-class predictions + jitter·I). Defaults: the DVERGE authors' ADP trainer (zjysteven/DVERGE,
    train/train_adp.py and arguments.py), which trains from scratch for 200 epochs at batch 128."""

    epochs: int = ranged(200, ge=0, le=COUNT_MAX)
    batch_size: int = ranged(128, ge=2, le=COUNT_MAX, note="the regularisers compare predictions within a batch")
    alpha: float = ranged(2.0, ge=0)  # ensemble-entropy weight (arguments.py; the paper's ADP_{2,0.5})
    beta: float = ranged(0.5, ge=0)  # log-determinant weight (arguments.py; the paper's ADP_{2,0.5})
    log_det_jitter: float = ranged(1e-6, ge=0)  # added to the Gram matrix's diagonal (train_adp.py det_offset)
    log_offset: float = ranged(1e-20, ge=0)  # inside the entropy's log (train_adp.py log_offset)
    # None: fresh initialisation (the reference trains from scratch); a stage name: its final weights.
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: _baseline_adam([100, 150]))  # arguments.py sch-intervals


@dataclass
class GalConfig(StageConfig):
    """GAL (Kariyappa & Qureshi, 2019): mean_i CE_i + λ·log Σ_{i<j} exp(cos(∇_x L_i, ∇_x L_j)). Defaults: the
    DVERGE authors' GAL trainer (zjysteven/DVERGE, train/train_gal.py and arguments.py), from scratch."""

    epochs: int = ranged(200, ge=0, le=COUNT_MAX)
    batch_size: int = ranged(128, ge=2, le=COUNT_MAX, note="the regularisers compare predictions within a batch")
    coherence_weight: float = ranged(0.5, ge=0)  # λ (arguments.py --lambda)
    log_offset: float = ranged(1e-20, ge=0)  # inside the coherence's log (train_gal.py log_offset)
    # Gaussian noise added to every training image (utils.py get_loaders(add_gaussian=True), after the GAL paper).
    input_noise_std: float = ranged(0.045, ge=0, note="pixel units")
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: _baseline_adam([100, 150]))


@dataclass
class TrsConfig(StageConfig):
    """TRS (Yang et al., NeurIPS 2021): Σ_i CE_i + scale·(λ_a·mean_{i<j} |cos(∇_x L_i, ∇_x L_j)| + λ_b·smoothness).
    Defaults: AI-secure/Transferability-Reduced-Smooth-Ensemble (1d246dd) train/Empirical/train_trs.py,
    trainer.py and utils/Empirical/script_train.py (the run script: from scratch, --plus-adv)."""

    epochs: int = ranged(120, ge=0, le=COUNT_MAX)  # train_trs.py --epochs
    batch_size: int = ranged(128, ge=2, le=COUNT_MAX, note="the regularisers compare predictions within a batch")  # --batch
    lambda_a: float = ranged(2.0, ge=0)  # gradient-cosine weight (--coeff)
    lambda_b: float = ranged(2.0, ge=0)  # smoothness weight (--lamda)
    scale: float = ranged(5.0, ge=0)  # multiplies both regularisers (--scale)
    # Smoothness on the batch with its second half moved by a PGD that maximises the submodels' input-gradient
    # norm (--plus-adv); off: on the clean batch. Its ε grows linearly from init_eps to adv_eps over the epochs.
    plus_adv: bool = True
    init_eps: float = ranged(0.1, ge=0, le=1, note=PIXELS)  # --init-eps
    adv_eps: float = ranged(0.2, ge=0, le=1, note=PIXELS)  # --adv-eps
    # trainer.py PGD: 6 steps of ε/3 from a uniform random start
    pgd_steps: int = ranged(6, ge=1, le=COUNT_MAX, note="turn the PGD off with trs.plus_adv=false")
    pgd_step_fraction: float = ranged(1 / 3, gt=0, note="step size = pgd_step_fraction × ε")
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: _baseline_adam([40, 80]))  # StepLR every 40 epochs


# Black-box transfer attacks (dvtrain.eval.blackbox) and their losses (dvtrain.attacks.attack_loss).
BlackboxLoss = Literal["ce", "cw"]
# The paper's transfer attacks (the default of eval.transfer.blackbox_attacks). The names are records of
# dvtrain.eval.attacks.transfer, checked against that registry by `dvtrain eval` before any work, so an
# attack registered from outside the package can be named here.
PAPER_BLACKBOX_ATTACKS = ("mi_pgd", "m_di2_fgsm", "sgm")
BLACKBOX_LOSSES = typing.get_args(BlackboxLoss)


@dataclass
class TransferConfig:
    """Transferability, black-box and ε-sweep evaluation. Defaults follow the reference code's
    evaluation (zjysteven/DVERGE eval/*.py) unless another source is named."""

    # Test images, drawn at random (seeded); reference: 1000. 0 takes the whole test set.
    num_images: int = ranged(1000, ge=0, le=COUNT_MAX, note="0: the whole test set")
    batch_size: int = ranged(500, ge=1, le=COUNT_MAX)
    # PGD-L∞ of the transferability matrix and of the ε sweep (reference: ε 0.03 for the matrix,
    # 50 steps of ε/5 from a random start, 5 restarts; an image counts as fooled if any restart fools it).
    eps: float = ranged(0.03, ge=0, le=1, note=PIXELS)
    steps: int = ranged(50, ge=1, le=COUNT_MAX)
    step_fraction: float = ranged(0.2, gt=0, note="step size = step_fraction × ε")
    restarts: int = ranged(5, ge=1, le=COUNT_MAX)
    # Reference white-box budgets.
    sweep_eps: list[float] = ranged(factory=lambda: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07], ge=0, le=1,
                                    nonempty=True, note=PIXELS)
    # White-box attacks of the ε sweep (dvtrain.eval.sweep), L∞ at every ε of `sweep_eps` on the black-box
    # protocol's images; the sweep's worst case per image is over all of them. autoattack and adaptive run
    # on the mixture only (their cost); the CIFAR-10 configs list the strong set, the default is cheap.
    # Names of white-box attack records (dvtrain.eval.attacks.registry, plug-ins included), checked by
    # `dvtrain eval` before any work, with the closest name for a typo; each must be an L∞ attack.
    sweep_attacks: list[str] = ranged(factory=lambda: ["pgd_linf", "pgd_linf_margin"], nonempty=True)
    # Black-box transfer (dvtrain.eval.blackbox; the paper's §5 protocol): surrogate ensembles of plain
    # classifiers of the run's architecture, one per size (reference: 3, 5 and 8), each a vanilla-stage run
    # with its own seed derived from `seed`; None epochs = vanilla.epochs.
    surrogate_sizes: list[int] = ranged(factory=lambda: [3, 5, 8], ge=1, le=COUNT_MAX, nonempty=True)
    surrogate_epochs: Optional[int] = ranged(None, ge=0, le=COUNT_MAX, note="null: vanilla.epochs")
    # The protocol's own seed (surrogates, test images, attack draws): not the run's seed, so that every run
    # on the same data is scored on the same transfer examples.
    seed: int = ranged(0, ge=0, le=SEED_MAX)
    # Where surrogates and example sets are shared between runs; null: `transfer_cache` beside the run
    # directory (in the folder that holds the runs).
    cache_dir: Optional[str] = None
    # Transfer attacks, each with each loss at every ε of `sweep_eps` (reference: all three, CE and CW).
    blackbox_attacks: list[str] = ranged(factory=lambda: list(PAPER_BLACKBOX_ATTACKS), nonempty=True)
    blackbox_losses: list[BlackboxLoss] = ranged(factory=lambda: list(BLACKBOX_LOSSES), nonempty=True)
    # Momentum PGD (reference: 100 steps, 3 restarts, steps of step_fraction·ε), M-DI²-FGSM and SGM
    # (reference: 100 steps, one run, steps of ε/steps).
    blackbox_steps: int = ranged(100, ge=1, le=COUNT_MAX)
    blackbox_restarts: int = ranged(3, ge=1, le=COUNT_MAX)
    momentum: float = ranged(1.0, ge=0)  # MI-FGSM decay µ (Dong et al., CVPR 2018)
    di_prob: float = ranged(0.5, ge=0, le=1, note="a probability")
    # DI²-FGSM: resize-and-pad 299 px up to 330 (Xie et al., CVPR 2019)
    di_resize: float = ranged(330 / 299, ge=1, note="padded size / image size")
    # SGM's decay of the gradient through residual branches (Wu et al., ICLR 2020; reference: 0.2)
    sgm_gamma: float = ranged(0.2, ge=0, le=1, note="1: the plain gradient")


AutoAttackVersion = Literal["standard", "rand", "custom"]
AutoAttackName = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"]  # pyautoattack's names
AutoAttackNorm = Literal["Linf", "L2"]
AUTOATTACK_VERSIONS = typing.get_args(AutoAttackVersion)
AUTOATTACK_ATTACKS = typing.get_args(AutoAttackName)
AUTOATTACK_NORMS = typing.get_args(AutoAttackNorm)


@dataclass
class AutoAttackConfig:
    """AutoAttack (Croce & Hein, ICML 2020) from the `pyautoattack` package, at eval.eps (Linf) and
    eval.l2_eps (L2). "standard" is RobustBench's version: APGD-CE, APGD-T, FAB-T, Square."""

    version: AutoAttackVersion = "standard"
    attacks: list[AutoAttackName] = field(default_factory=list)  # version "custom" only
    norms: list[AutoAttackNorm] = ranged(factory=lambda: ["Linf", "L2"], nonempty=True)
    # None keeps the library's budget (100 iterations, 5000 Square queries); a number caps it (quick runs).
    iterations: Optional[int] = ranged(None, ge=1, le=COUNT_MAX, note="null: the library's budget")
    square_queries: Optional[int] = ranged(None, ge=1, le=COUNT_MAX, note="null: the library's budget")
    # 0: the table's images (eval.num_examples); N: its first N of them.
    num_examples: int = ranged(0, ge=0, le=COUNT_MAX, note="0: the table's images")


@dataclass
class AdaptiveConfig:
    """The ensemble attack on the mixture (dvtrain.eval.attacks.adaptive, after MORA: Yu, Gao & Xu, NeurIPS 2022,
    arXiv 2211.08008) at eval.eps, L∞: untargeted runs over `blend_scales`, then targeted runs at the
    ensemble's next `target_classes` classes, each on the images still robust.

    Defaults: MORA's `standard-t-pre` schedule for a softmax-averaging ensemble (100 steps, cosine decay
    from 2ε, inverse temperature 0.2, blends 0.5, 0, 0.25, 0.75, 1, targeted at blend 0.5 over 9 classes);
    checked on training images, never test images (docs/evaluation.md, "The ensemble attack")."""

    steps: int = ranged(100, ge=1, le=COUNT_MAX, note="steps of each run")
    # The step size starts at initial_step·ε and decays to 0 along a half cosine (MORA; the 2ε start is APGD's).
    initial_step: float = ranged(2.0, gt=0, note="step size at the first step, in units of eval.eps")
    # Weight of the new sign step against the previous displacement (APGD's heavy-ball momentum α = 0.75).
    momentum: float = ranged(0.75, gt=0, le=1, note="1: plain sign steps")
    # 1/temperature of the submodels' softmaxes in their per-image weights (MORA's float_dis).
    inverse_temperature: float = ranged(0.2, gt=0, note="multiplies the logits before the softmax")
    # A submodel whose top-2 logit gap exceeds this is rescaled so that the largest gap equals it (per image).
    rescale_gap: float = ranged(10.0, gt=0, note="logit units")
    # One untargeted run per entry, in order: 0 attacks the mixture's (normalised) log-probabilities alone,
    # 1 the reweighed submodels' logits alone.
    blend_scales: list[float] = ranged(factory=lambda: [0.5, 0.0, 0.25, 0.75, 1.0], ge=0, le=1, nonempty=True)
    targeted_scale: float = ranged(0.5, ge=0, le=1, note="blend of the targeted runs")
    # Targeted runs at the mixture's 2nd, 3rd, … most likely classes on the clean image (0: none).
    target_classes: int = ranged(9, ge=0, le=COUNT_MAX, note="capped at the number of classes - 1")
    # The whole schedule again from fresh random starts, on the images still robust.
    restarts: int = ranged(1, ge=1, le=COUNT_MAX)


@dataclass
class DiversityConfig:
    """The vulnerability-diversity matrix of each stage (`dvtrain eval`, dvtrain.eval.diversity): entry
    (i, j) = mean CE(f_j(x'_{f_i^l}(x, x_s)), y), the seed report's eq. 2 and the DVERGE paper's diversity
    matrix. Defaults follow the DVERGE authors' eval/eval_diversity.py: batches of 10 test-image pairs,
    a random layer per batch, distillation as in training with the models in eval mode."""

    enabled: bool = True
    num_images: int = ranged(1000, ge=1, le=COUNT_MAX, note="pairs (x, x_s) of test images; capped at the test set's size")
    batch_size: int = ranged(10, ge=1, le=COUNT_MAX, note="one random layer per batch")
    # None draws a layer per batch, uniform over the model's layers; an integer fixes it (1-based).
    layer: Optional[int] = ranged(None, ge=1, le=COUNT_MAX, note="layers are 1-based; null draws one per batch")
    # Distillation budget: None takes the stage's own (its dverge or dverge_advt section; the dverge
    # section for the other stages), so the matrix measures the vulnerability the stage was trained on.
    eps: Optional[float] = ranged(None, ge=0, le=1, note=PIXELS + "; null: the stage's distillation ε")
    step_size: Optional[float] = ranged(None, gt=0, note="pixel units; null: the stage's")
    steps: Optional[int] = ranged(None, ge=1, le=COUNT_MAX, note="null: the stage's distillation steps")


@dataclass
class MaskingChecksConfig:
    """Gradient-masking checks printed under the `dvtrain eval` tables (Carlini et al. 2019, "On
    evaluating adversarial robustness", §4 and §5: what a sound evaluation shows)."""

    enabled: bool = True
    # PGD-L∞ with eval.steps vs this many steps: more steps must not raise accuracy
    long_steps: int = ranged(100, ge=1, le=COUNT_MAX)
    # L∞ budget that covers the whole pixel range: accuracy must reach 0 %
    unbounded_eps: float = ranged(1.0, ge=0, le=1, note=PIXELS)
    unbounded_step_size: float = ranged(0.1, gt=0, note="pixel units")


@dataclass
class EvalConfig:
    """White-box evaluation. Defaults follow the report: 10-step PGD, ε 0.03, step 0.007."""

    eps: float = ranged(0.03, ge=0, le=1, note=PIXELS)
    steps: int = ranged(10, ge=1, le=COUNT_MAX)
    step_size: float = ranged(0.007, gt=0, note="pixel units; a negative step would descend the loss")
    l2_eps: float = ranged(0.03, ge=0, note="L2 norm in pixel units")
    l2_step_size: float = ranged(0.007, gt=0, note="pixel units; a negative step would descend the loss")
    random_start: bool = True
    # PGD runs from this many random starts; an image counts as robust only if it withstands every one.
    restarts: int = ranged(1, ge=1, le=COUNT_MAX)
    # 0 evaluates the whole test set; N uses its first N images.
    num_examples: int = ranged(0, ge=0, le=COUNT_MAX, note="0: the whole test set")
    batch_size: int = ranged(500, ge=1, le=COUNT_MAX)
    # The table's images are attacked in fixed chunks of at most this many (sizes within one of each other,
    # so that processes get even shares), each with its own random streams, so no number depends on
    # how many processes shared the chunks out (`dvtrain eval` under a launcher).
    chunk_size: int = ranged(100, ge=1, le=COUNT_MAX, note="images per chunk; at least as many chunks as processes")
    # How long a process of a launched `dvtrain eval` waits for the others' tasks (a surrogate ensemble
    # may train for hours while a rank with less work waits; dist.timeout_s bounds training's collectives).
    task_timeout_s: float = ranged(7 * 24 * 3600.0, gt=0, le=TIMEOUT_MAX_S, note="seconds")
    # The training run's table after each stage (keep it fast) and `dvtrain eval`'s table. Each table
    # adds the worst case per image of what it ran. The names are white-box attack records
    # (dvtrain.eval.attacks.registry: "_margin" / "_dlr" use the CW margin / DLR loss instead of
    # cross-entropy, "autoattack" runs at each norm of eval.autoattack.norms; plug-ins' records too),
    # checked before any work by training and `dvtrain eval`, with the closest name for a typo.
    attacks: list[str] = ranged(
        factory=lambda: ["clean", "fgsm", "pgd_linf", "pgd_l2", "pgd_linf_margin"], nonempty=True)
    full_attacks: list[str] = ranged(factory=lambda: [
        "clean", "fgsm", "pgd_linf", "pgd_l2", "pgd_linf_margin", "pgd_l2_margin", "autoattack", "adaptive"],
        nonempty=True)
    # Attacks of full_attacks run on the mixture only (the headline model), not on each submodel: a
    # quick budget's choice for the costly ones (docs/evaluation.md, "Budgets"). "adaptive" always is.
    mixture_only: list[str] = ranged(factory=list, note="empty: every attack on every model")
    # Randomised attacks (random starts) are repeated with this many seeds; rows give mean ± s.d.
    seeds: int = ranged(1, ge=1, le=COUNT_MAX)
    autoattack: AutoAttackConfig = field(default_factory=AutoAttackConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    checks: MaskingChecksConfig = field(default_factory=MaskingChecksConfig)
    # `dvtrain eval`: transferability, black-box transfer, ε sweep (see docs/evaluation.md).
    transfer: TransferConfig = field(default_factory=TransferConfig)
    # The sections of plug-in tables that declare settings (a `Table.settings` dataclass), by table name:
    # eval.tables.NAME.FIELD; typed, ranged and overridden like the sections above (docs/extending.md).
    tables: dict[str, Any] = field(default_factory=lambda: _table_sections({}, "eval.tables"))


@dataclass
class ComputeConfig:
    """Speed options of the training loop (see dvtrain.compute); fp32, eager and NCHW by default."""

    # bf16: training forwards and backwards under torch.autocast (weights, optimizer and evaluation fp32).
    precision: Precision = "fp32"
    channels_last: bool = False
    # torch.compile the models' layer-indexed features (one graph per layer); eager if compiling fails.
    compile: bool = False
    # Torch CPU threads per process: N, or auto (the cores available divided by this node's processes,
    # at most torch's own default). Default 1: on a busy 2-core machine 2 threads made a DVERGE step of
    # the Conv net 10x slower and of ResNet-20 >6x slower, while on an idle one they gained at most 1.3x
    # (docs/performance.md); and one thread per process gives the same weights whatever the process count.
    threads: Union[int, str] = ranged(1, ge=1, le=THREADS_MAX, note="threads per process, or auto")
    # GPU only: capture each DVERGE step (distillation PGD, training forwards, backward, optimizer step)
    # as one CUDA graph per layer and batch shape, and replay it (see dvtrain.compute.CapturedStep).
    cuda_graphs: bool = False


@dataclass
class LoggingConfig:
    # auto: online when a W&B API key is configured, offline otherwise.
    wandb: WandbMode = "auto"
    project: str = "dvtrain"
    entity: Optional[str] = None
    # Seconds W&B may take to start before dvtrain gives up with an error instead of hanging.
    init_timeout_s: float = ranged(60.0, gt=0, le=TIMEOUT_MAX_S, note="seconds")
    progress: bool = True
    # Time the distill / all-gather / train phases of each DVERGE step (synchronises a GPU: off by default).
    step_timing: bool = False
    # Step figures stay on the device and are reduced, checked and logged every this many steps
    # (and before every checkpoint); Ctrl-C is answered at these points too.
    every_steps: int = ranged(10, ge=1, le=COUNT_MAX)
    # Also upload each stage's final checkpoint to W&B as a model artifact.
    artifacts: bool = False


@dataclass
class CheckpointConfig:
    # Also checkpoint every N optimizer steps (0: only at epoch ends); resuming replays the epoch's batches.
    every_steps: int = ranged(0, ge=0, le=COUNT_MAX, note="0: epoch ends only")


@dataclass
class DistConfig:
    timeout_s: int = ranged(600, ge=1, le=TIMEOUT_MAX_S, note="seconds")


# The built-in stages, in training order (`dvtrain compare` orders its columns the same way); plug-ins
# follow them (`dvtrain.stages`). Trainers are named by module so that this registry imports no training code.
for _spec in (
    StageSpec("vanilla", VanillaConfig, "dvtrain.train.vanilla:Vanilla"),
    StageSpec("adp", AdpConfig, "dvtrain.train.baselines:Adp"),
    StageSpec("gal", GalConfig, "dvtrain.train.baselines:Gal"),
    StageSpec("trs", TrsConfig, "dvtrain.train.baselines:Trs"),
    StageSpec("dverge", DvergeConfig, "dvtrain.train.dverge:Dverge", distils=True),
    StageSpec("dverge_advt", DvergeConfig, "dvtrain.train.dverge:DvergeAdvt", distils=True,
              section=lambda: DvergeConfig(epochs=50, plus_adv=True)),
):
    register_built_in(_spec)
# The built-in stages' names (every registered stage, plug-ins included: `dvtrain.stages.names()`).
STAGES = stage_registry.built_in_names()
DEFAULT_STAGES = ("vanilla", "dverge", "dverge_advt")


def default_sections() -> dict[str, StageConfig]:
    """Every registered stage's section at its defaults, by stage name."""
    return {name: spec.default_section() for name, spec in stage_registry.specs().items()}


@dataclass(init=False)
class Config:
    """The whole configuration. Each registered stage has a section named after it, kept in `sections`
    and read as `cfg.section(name)` (or `cfg.<name>` where the stage is known by name, e.g. `cfg.dverge`);
    in YAML, in `to_dict` and on the command line a stage's section is a top-level key like the others.
    `Config(dverge=DvergeConfig(...))` and `dataclasses.replace(cfg, vanilla=...)` set sections too."""

    name: str = "quickstart"
    seed: int = ranged(0, ge=0, le=SEED_MAX)
    runs_dir: str = "runs"
    # "auto" picks CUDA when available, else the CPU.
    device: str = "auto"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    sections: dict[str, StageConfig] = field(default_factory=default_sections)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __init__(self, sections: dict[str, StageConfig] | None = None, **values: Any) -> None:
        registered = stage_registry.specs()
        sections = default_sections() if sections is None else dict(sections)
        sections.update({name: values.pop(name) for name in list(values) if name in registered})
        for f in dataclasses.fields(self):
            if f.name == "sections":
                value = sections
            elif f.name in values:
                value = values.pop(f.name)
            else:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            object.__setattr__(self, f.name, value)
        if values:
            raise TypeError(f"Config() got unknown keys {', '.join(values)} (no field or registered stage has those names)")

    def section(self, stage: str) -> StageConfig:
        """The section of stage `stage`.

        Raises:
            ConfigError: no registered stage has that name.
        """
        found = self.sections.get(stage)
        if found is None:
            raise ConfigError(f"no config section for stage {stage!r}; the stages are {', '.join(self.sections)}")
        return found

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes: the stage sections
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"'Config' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "sections" and name in self.__dict__.get("sections", {}):
            self.sections[name] = value
        else:
            object.__setattr__(self, name, value)


# ----------------------------------------------------------------------------- building


def _parse_number(text: str, kind: type) -> Any:
    """Strings that mean a float: `1e-3` (which YAML 1.1 reads as a string) and `8/255` (ε values
    are conventionally written as fractions of 255)."""
    if kind is not float or not isinstance(text, str):
        return text
    try:
        return float(text)
    except ValueError:
        pass
    if text.count("/") == 1:
        num, den = text.split("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:  # the type of its choices; `validate` checks the choice itself
        hint = type(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type the value fits, e.g. int | str for `N` or `auto`
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        return _coerce(value, args[-1], key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}; write it as [a, b, ...]")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section, got {value!r}; set its fields as {key}.FIELD=VALUE")
        return _build(hint, value, prefix=f"{key}.")
    value = _parse_number(value, hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' must be of type {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _keys(cls: type) -> set[str]:
    """The keys a section takes: its fields; at the top level the stage sections stand for `sections`."""
    known = {f.name for f in dataclasses.fields(cls)}
    return known - {"sections"} | set(stage_registry.names()) if cls is Config else known


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = _keys(cls)
    for key in values:
        if cls is Config and key in RENAMED_SECTIONS:
            raise ConfigError(
                f"config section '{key}' is now called '{RENAMED_SECTIONS[key]}' (sections are named after their stage); "
                f"rename it in the YAML file or the override"
            )
        if prefix + key in RETIRED_KEYS:
            print(f"dvtrain: note: config key '{prefix}{key}' is ignored: {RETIRED_KEYS[prefix + key]}", file=sys.stderr)
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f"did you mean '{prefix}{close[0]}'?" if close else
                    f"the keys under '{prefix or '<top>'}' are {', '.join(sorted(known))}"
                    + ("; a plug-in stage's section needs the package that registers it (entry point group "
                       f"{stage_registry.ENTRY_POINT_GROUP})" if cls is Config else ""))
            raise ConfigError(f"unknown config key '{prefix}{key}'; {hint}")
    default = cls()
    kwargs = {}
    for name in known:
        if cls is EvalConfig and name == "tables":
            kwargs[name] = _table_sections(values.get(name, {}), prefix + name)
        elif name in values:
            sub_default = getattr(default, name)
            hint = hints[name] if name in hints else stage_registry.spec(name).config
            raw = values[name]
            if dataclasses.is_dataclass(sub_default) and isinstance(raw, dict):
                merged = _merge(dataclasses.asdict(sub_default), raw)
                kwargs[name] = _coerce(merged, hint, prefix + name)
            else:
                kwargs[name] = _coerce(raw, hint, prefix + name)
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def _table_sections(values: Any, key: str) -> dict[str, Any]:
    """eval.tables: each plug-in table's settings at their defaults, updated from `values` (NAME → fields)."""
    settings = table_settings(ConfigError)
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{key}' is a section, got {values!r}; set its fields as {key}.TABLE.FIELD=VALUE")
    for name in values:
        if name not in settings:
            close = difflib.get_close_matches(str(name), settings, n=1)
            hint = (f"did you mean '{key}.{close[0]}'?" if close else
                    (f"the plug-in tables with settings are {', '.join(settings)}" if settings else
                     "no installed plug-in table declares settings")
                    + f"; a plug-in table's section needs the package that registers it (entry point group {TABLES_GROUP})")
            raise ConfigError(f"unknown config key '{key}.{name}'; {hint}")
    sections = {}
    for name, cls in settings.items():
        raw = values.get(name, {})
        merged = _merge(dataclasses.asdict(cls()), raw) if isinstance(raw, dict) else raw  # (not a dict: refused)
        sections[name] = _coerce(merged, cls, f"{key}.{name}")
    return sections


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}' goes inside a value that is not a section")
    node[parts[-1]] = value


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (YAML 1.2 forbids it; PyYAML silently keeps the last value)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__("while constructing a mapping", first, f"found duplicate key {key!r}", again)
        self.key = key
        self.where = (f"line {first.line + 1}" if first.line == again.line
                      else f"lines {first.line + 1} and {again.line + 1}")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a mapping naming a key twice, at any depth (a section such as
    `dverge:` written twice would otherwise keep only its second copy, and the first one's values would
    silently return to their defaults). Keys brought in by a `<<` merge may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeConstructor names it itself
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate keys (`UniqueKeyLoader`); raises yaml.YAMLError."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. dverge.eps=0.03)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"override '{text}' names the key {exc.key!r} twice; keep one of them") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    text = read_text(path, "config file", "pass an existing file with --config")
    try:
        data = load_yaml_text(text)
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"config file '{path}' names the key {exc.key!r} twice in one section ({exc.where}); "
            "YAML keeps only the last one, so merge the two into one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values at its top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← `key=value` overrides, validated."""
    tree = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The configuration as nested dicts, each stage's section at the top level (as in YAML)."""
    tree = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "sections":
            tree.update({name: dataclasses.asdict(section) for name, section in value.items()})
        else:
            tree[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return tree


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff_configs(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configurations."""

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in fa if fa[k] != fb.get(k))


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_value(key: str, value: Any, hint: Any, valid: Range | None) -> None:
    """One value against its field's declaration: a Literal's choices, finiteness, the declared range."""
    if value is None:
        return
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        _check(value in choices, f"{key}={value!r} must be one of {', '.join(choices)}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    note = f" ({valid.note})" if valid is not None and valid.note else ""
    within = f" {valid.describe(value)}" if valid is not None else ""
    _check(isinstance(value, int) or math.isfinite(value), f"{key}={value!r} must be a finite number{within}{note}")
    _check(valid is None or value in valid, f"{key}={value!r} must be{within}{note}")


def check_section(section: Any, prefix: str = "") -> None:
    """Every field of a config dataclass and of its nested sections against its declaration: choices
    (Literal types), finite numbers, and the `Range` declared beside it with `ranged`; the first
    violation is raised as a one-line ConfigError naming the key, the value and the valid range."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        key, value, hint = prefix + f.name, getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_section(value, key + ".")
            continue
        if f.name == "sections":  # the stage sections, each under its stage's name
            for name, stage_section in value.items():
                check_section(stage_section, prefix + name + ".")
            continue
        if isinstance(section, EvalConfig) and f.name == "tables":  # plug-in tables' sections, by table name
            for name, table_section in value.items():
                check_section(table_section, f"{key}.{name}.")
            continue
        valid: Range | None = f.metadata.get("range")
        if typing.get_origin(hint) is list:
            (item_hint,) = typing.get_args(hint)
            _check(not (valid and valid.nonempty and not value), f"{key}=[] must list at least one value")
            for i, item in enumerate(value):
                _check_value(f"{key}[{i}]", item, item_hint, valid)
        else:
            _check_value(key, value, hint, valid)


def validate(cfg: Config) -> None:
    """Every declared range and choice (`check_section`), then the rules that relate several fields."""
    check_section(cfg)
    _check(bool(cfg.name) and "/" not in cfg.name and "\\" not in cfg.name and cfg.name not in (".", ".."),
           f"name={cfg.name!r} must be a plain directory name (no '/', not '.' or '..')")
    _check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
           f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    registered = stage_registry.names()
    _check(len(cfg.stages) > 0, "stages is empty; list at least one of " + ", ".join(registered))
    for i, stage in enumerate(cfg.stages):
        _check(stage in registered, f"stages[{i}]={stage!r} must be one of {', '.join(registered)} (a plug-in stage "
               f"is registered by its package's entry point, group {stage_registry.ENTRY_POINT_GROUP})")
    _check(len(set(cfg.stages)) == len(cfg.stages), f"stages={cfg.stages} lists a stage twice")
    for stage, section in cfg.sections.items():  # the stage whose final weights a stage starts from (None: fresh)
        source = section.init_from
        may_be_null = typing.get_type_hints(type(section))["init_from"] != str
        _check(source is None or (source in cfg.sections and source != stage),
               f"{stage}.init_from={source!r} must " + ("be null (fresh weights) or name" if may_be_null else "name")
               + f" another stage ({', '.join(cfg.sections)})")
    _check(cfg.eval.restarts == 1 or cfg.eval.random_start,
           f"eval.restarts={cfg.eval.restarts} needs eval.random_start=true: restarts from one start repeat one attack")
    a = cfg.eval.autoattack
    _check((a.version == "custom") == bool(a.attacks),
           "eval.autoattack.attacks is for version=custom only, and version=custom needs a non-empty attacks list")
    _check(cfg.compute.threads == "auto" or (isinstance(cfg.compute.threads, int) and cfg.compute.threads >= 1),
           f"compute.threads={cfg.compute.threads!r} must be auto or a number of threads >= 1")

"""Typed configuration: the single source of every hyperparameter.

A run's configuration is built from the dataclass defaults, then a YAML file, then dotted
``key=value`` overrides from the command line. Every value is type-checked against the dataclass
annotations, so a typo in a key or a value stops the run before any work is done.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dvtrain.errors import DvtrainError

# In training order; `dvtrain compare` orders its columns the same way.
STAGES = ("vanilla", "adp", "gal", "trs", "dverge", "dverge_advt")
# The ensemble-diversity baselines the DVERGE paper compares against (dvtrain.train.baselines).
BASELINES = ("adp", "gal", "trs")
DEFAULT_STAGES = ("vanilla", "dverge", "dverge_advt")
DATASETS = ("digits", "fashion_mnist", "cifar10")
ARCHS = ("conv", "resnet20")
WANDB_MODES = ("auto", "online", "offline", "disabled")
BN_MODES = ("train", "eval")
ENGINES = ("loop", "grouped")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam")
# Sections renamed so that each stage's section carries the stage's name: old name → new name.
RENAMED_SECTIONS = {"pretrain": "vanilla"}


class ConfigError(DvtrainError):
    pass


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    # CIFAR-10 only: fetch the archive where there is internet.
    download: bool = False
    # CIFAR-10 only: torchvision's md5 check of the batch files (off for hand-made test files).
    verify_checksums: bool = True
    # Random crop (zero padding) + horizontal flip, done on the device each epoch.
    augment: bool = False
    crop_padding: int = 4
    # Skip each epoch's last partial training batch, so every step has the same shapes (needed for
    # compute.cuda_graphs to capture every step; off: every image is used, as the reference does).
    drop_last: bool = False
    # digits only: share of the 1797 images held out; the split is fixed by `split_seed`, not `seed`,
    # so runs with different seeds are scored on the same test images.
    test_fraction: float = 0.2
    split_seed: int = 0
    # 0 keeps everything; a positive number keeps the first N images (quick runs, tests).
    train_limit: int = 0
    test_limit: int = 0


@dataclass
class ModelConfig:
    arch: str = "conv"
    # conv only: padding of the two 5x5 convolutions; None picks 2 for inputs below 28 px, else 0.
    conv_padding: Optional[int] = None


@dataclass
class EnsembleConfig:
    size: int = 3


@dataclass
class OptimConfig:
    """SGD with momentum, or Adam; the learning rate is multiplied by `gamma` at each epoch in `milestones`."""

    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only (Adam keeps its default betas)
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    eps: float = 1e-8  # Adam only: added to the denominator


@dataclass
class VanillaConfig:
    """The `vanilla` stage: each submodel trained alone on clean data with its own data order."""

    epochs: int = 30
    batch_size: int = 32
    # None: fresh weights (plain pretraining); a stage name: start from that stage's final weights.
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class DvergeConfig:
    """A DVERGE stage. Defaults follow the reference code (github zjysteven/DVERGE)."""

    epochs: int = 200
    batch_size: int = 128
    # Feature distillation: PGD in input space from x_s towards the layer-l features of x.
    eps: float = 0.07
    step_size: float = 0.007
    steps: int = 10
    random_start: bool = False
    # Per-sample L1-normalised gradients accumulated with this momentum (reference: 1.0);
    # 0 gives plain sign-gradient PGD.
    momentum: float = 1.0
    # None draws a layer uniformly at random each epoch; an integer fixes it (1-based).
    layer: Optional[int] = None
    # BatchNorm mode of the distillation forwards: "train" (reference) or "eval".
    bn_mode: str = "train"
    # loss_i = diversity_weight * sum_{j!=i} CE(f_i(x'_j), y_s) + clean_weight * CE(f_i(x), y)
    #          (+ CE(f_i(adv_i), y_s) with plus_adv). Reference: 1 and 0; the report's eq. 4: α and 1.
    diversity_weight: float = 1.0
    clean_weight: float = 0.0
    # DVERGE+AdvT: also train each submodel on its own PGD-L∞ adversarial examples.
    plus_adv: bool = False
    adv_eps: float = 8 / 255
    adv_step_size: float = 2 / 255
    adv_steps: int = 10
    # How the owned submodels' distillation and diversity gradients are computed (see dvtrain.train.engines).
    engine: str = "loop"
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
class AdpConfig:
    """ADP (Pang et al., ICML 2019): Σ_i CE_i − α·H(mean prediction) − β·log det(Gram of the normalised
    non-true-class predictions + jitter·I). Defaults: the DVERGE authors' ADP trainer (zjysteven/DVERGE,
    train/train_adp.py and arguments.py), which trains from scratch for 200 epochs at batch 128."""

    epochs: int = 200
    batch_size: int = 128
    alpha: float = 2.0  # ensemble-entropy weight (arguments.py; the paper's ADP_{2,0.5})
    beta: float = 0.5  # log-determinant weight (arguments.py; the paper's ADP_{2,0.5})
    log_det_jitter: float = 1e-6  # added to the Gram matrix's diagonal (train_adp.py det_offset)
    log_offset: float = 1e-20  # inside the entropy's log (train_adp.py log_offset)
    # None: fresh initialisation (the reference trains from scratch); a stage name: its final weights.
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: _baseline_adam([100, 150]))  # arguments.py sch-intervals


@dataclass
class GalConfig:
    """GAL (Kariyappa & Qureshi, 2019): mean_i CE_i + λ·log Σ_{i<j} exp(cos(∇_x L_i, ∇_x L_j)). Defaults: the
    DVERGE authors' GAL trainer (zjysteven/DVERGE, train/train_gal.py and arguments.py), from scratch."""

    epochs: int = 200
    batch_size: int = 128
    coherence_weight: float = 0.5  # λ (arguments.py --lambda)
    log_offset: float = 1e-20  # inside the coherence's log (train_gal.py log_offset)
    # Gaussian noise added to every training image (utils.py get_loaders(add_gaussian=True), after the GAL paper).
    input_noise_std: float = 0.045
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: _baseline_adam([100, 150]))


@dataclass
class TrsConfig:
    """TRS (Yang et al., NeurIPS 2021): Σ_i CE_i + scale·(λ_a·mean_{i<j} |cos(∇_x L_i, ∇_x L_j)| + λ_b·smoothness).
    Defaults: AI-secure/Transferability-Reduced-Smooth-Ensemble (1d246dd) train/Empirical/train_trs.py,
    trainer.py and utils/Empirical/script_train.py (the run script: from scratch, --plus-adv)."""

    epochs: int = 120  # train_trs.py --epochs
    batch_size: int = 128  # train_trs.py --batch
    lambda_a: float = 2.0  # gradient-cosine weight (--coeff)
    lambda_b: float = 2.0  # smoothness weight (--lamda)
    scale: float = 5.0  # multiplies both regularisers (--scale)
    # Smoothness on the batch with its second half moved by a PGD that maximises the submodels' input-gradient
    # norm (--plus-adv); off: on the clean batch. Its ε grows linearly from init_eps to adv_eps over the epochs.
    plus_adv: bool = True
    init_eps: float = 0.1  # --init-eps
    adv_eps: float = 0.2  # --adv-eps
    pgd_steps: int = 6  # trainer.py PGD: 6 steps of ε/3 from a uniform random start
    pgd_step_fraction: float = 1 / 3
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: _baseline_adam([40, 80]))  # StepLR every 40 epochs


@dataclass
class TransferConfig:
    """Transferability, black-box and ε-sweep evaluation. Defaults follow the reference code's
    evaluation (zjysteven/DVERGE eval/*.py) unless another source is named."""

    # Test images, drawn at random (seeded); reference: 1000. 0 takes the whole test set.
    num_images: int = 1000
    batch_size: int = 500
    # PGD-L∞ of the transferability matrix and of the ε sweep (reference: ε 0.03 for the matrix,
    # 50 steps of ε/5 from a random start, 5 restarts; an image counts as fooled if any restart fools it).
    eps: float = 0.03
    steps: int = 50
    step_fraction: float = 0.2  # step size = step_fraction × ε
    restarts: int = 5
    # Reference white-box budgets.
    sweep_eps: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07])
    # APGD-CE in the white-box table, at eval.eps (Croce & Hein 2020 / AutoAttack: 100 iterations).
    apgd_steps: int = 100
    apgd_restarts: int = 1
    # Black-box: a surrogate ensemble of plain classifiers with other seeds (reference: 3, 5 or 8),
    # trained like the vanilla stage; None epochs = vanilla.epochs.
    surrogate_size: int = 3
    surrogate_epochs: Optional[int] = None
    # Transferred attacks at ε = `eps`: momentum PGD (reference: 100 steps, 3 restarts) and
    # M-DI²-FGSM (reference: 100 steps, transform probability 0.5).
    blackbox_steps: int = 100
    blackbox_restarts: int = 3
    momentum: float = 1.0  # MI-FGSM decay µ (Dong et al., CVPR 2018)
    di_prob: float = 0.5
    di_resize: float = 330 / 299  # DI²-FGSM: resize-and-pad 299 px up to 330 (Xie et al., CVPR 2019)


def check_transfer_config(cfg: TransferConfig, prefix: str = "eval.transfer.") -> None:
    """Reject impossible values before any work is done (same contract as `dvtrain.config.validate`)."""
    checks = {
        "num_images": (cfg.num_images >= 0, ">= 0 (0: the whole test set)"),
        "batch_size": (cfg.batch_size >= 1, ">= 1"),
        "eps": (0.0 <= cfg.eps <= 1.0, "in [0, 1] (pixel units)"),
        "steps": (cfg.steps >= 1, ">= 1"),
        "step_fraction": (cfg.step_fraction > 0, "> 0"),
        "restarts": (cfg.restarts >= 1, ">= 1"),
        "sweep_eps": (len(cfg.sweep_eps) > 0 and all(0.0 <= e <= 1.0 for e in cfg.sweep_eps),
                      "a non-empty list of budgets in [0, 1]"),
        "apgd_steps": (cfg.apgd_steps >= 1, ">= 1"),
        "apgd_restarts": (cfg.apgd_restarts >= 1, ">= 1"),
        "surrogate_size": (cfg.surrogate_size >= 1, ">= 1"),
        "surrogate_epochs": (cfg.surrogate_epochs is None or cfg.surrogate_epochs >= 0, ">= 0 or null (vanilla.epochs)"),
        "blackbox_steps": (cfg.blackbox_steps >= 1, ">= 1"),
        "blackbox_restarts": (cfg.blackbox_restarts >= 1, ">= 1"),
        "momentum": (cfg.momentum >= 0, ">= 0"),
        "di_prob": (0.0 <= cfg.di_prob <= 1.0, "in [0, 1]"),
        "di_resize": (cfg.di_resize >= 1.0, ">= 1"),
    }
    for key, (ok, requirement) in checks.items():
        if not ok:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)!r} must be {requirement}")


@dataclass
class EvalConfig:
    """White-box evaluation. Defaults follow the report: 10-step PGD, ε 0.03, step 0.007."""

    eps: float = 0.03
    steps: int = 10
    step_size: float = 0.007
    l2_eps: float = 0.03
    l2_step_size: float = 0.007
    random_start: bool = True
    # PGD runs from this many random starts; an image counts as robust only if it withstands every one.
    restarts: int = 1
    # 0 evaluates the whole test set; N uses its first N images.
    num_examples: int = 0
    batch_size: int = 500
    # `dvtrain eval`: transferability, black-box transfer, ε sweep, APGD (see docs/evaluation.md).
    transfer: TransferConfig = field(default_factory=TransferConfig)


@dataclass
class ComputeConfig:
    """Speed options of the training loop (see dvtrain.compute); fp32, eager and NCHW by default."""

    # bf16: training forwards and backwards under torch.autocast (weights, optimizer and evaluation fp32).
    precision: str = "fp32"
    channels_last: bool = False
    # torch.compile the models' layer-indexed features (one graph per layer); eager if compiling fails.
    compile: bool = False
    # GPU only: capture each DVERGE step (distillation PGD, training forwards, backward, optimizer step)
    # as one CUDA graph per layer and batch shape, and replay it (see dvtrain.compute.CapturedStep).
    cuda_graphs: bool = False


@dataclass
class LoggingConfig:
    # auto: online when a W&B API key is configured, offline otherwise.
    wandb: str = "auto"
    project: str = "dvtrain"
    entity: Optional[str] = None
    # Seconds W&B may take to start before dvtrain gives up with an error instead of hanging.
    init_timeout_s: float = 60.0
    progress: bool = True
    # Time the distill / all-gather / train phases of each DVERGE step (synchronises a GPU: off by default).
    step_timing: bool = False
    # Step figures stay on the device and are reduced, checked and logged every this many steps
    # (and before every checkpoint); Ctrl-C is answered at these points too.
    every_steps: int = 10


@dataclass
class CheckpointConfig:
    # Also checkpoint every N optimizer steps (0: only at epoch ends); resuming replays the epoch's batches.
    every_steps: int = 0


@dataclass
class DistConfig:
    timeout_s: int = 600


@dataclass
class Config:
    name: str = "quickstart"
    seed: int = 0
    runs_dir: str = "runs"
    # "auto" picks CUDA when available, else the CPU.
    device: str = "auto"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    vanilla: VanillaConfig = field(default_factory=VanillaConfig)
    dverge: DvergeConfig = field(default_factory=DvergeConfig)
    dverge_advt: DvergeConfig = field(default_factory=lambda: DvergeConfig(epochs=50, plus_adv=True))
    adp: AdpConfig = field(default_factory=AdpConfig)
    gal: GalConfig = field(default_factory=GalConfig)
    trs: TrsConfig = field(default_factory=TrsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)


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
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
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


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if cls is Config and key in RENAMED_SECTIONS:
            raise ConfigError(
                f"config section '{key}' is now called '{RENAMED_SECTIONS[key]}' (sections are named after their stage); "
                f"rename it in the YAML file or the override"
            )
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys under '{prefix or '<top>'}': {', '.join(sorted(known))}"
            )
    default = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            sub_default = getattr(default, f.name)
            raw = values[f.name]
            if dataclasses.is_dataclass(sub_default) and isinstance(raw, dict):
                merged = _merge(dataclasses.asdict(sub_default), raw)
                kwargs[f.name] = _coerce(merged, hints[f.name], prefix + f.name)
            else:
                kwargs[f.name] = _coerce(raw, hints[f.name], prefix + f.name)
        else:
            kwargs[f.name] = getattr(default, f.name)
    return cls(**kwargs)


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


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. dverge.eps=0.03)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing file with --config")
    try:
        data = yaml.safe_load(path.read_text())
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
    return dataclasses.asdict(cfg)


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


def _check_eps(key: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, f"{key}={value} is outside [0, 1]; ε is in pixel units of images in [0, 1]")


def validate(cfg: Config) -> None:
    _check(cfg.seed >= 0, f"seed={cfg.seed} must be >= 0")
    _check(bool(cfg.name) and "/" not in cfg.name and "\\" not in cfg.name and cfg.name not in (".", ".."),
           f"name={cfg.name!r} must be a plain directory name (no '/', not '.' or '..')")
    _check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
           f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    _check(len(cfg.stages) > 0, "stages is empty; list at least one of " + ", ".join(STAGES))
    for s in cfg.stages:
        _check(s in STAGES, f"stage '{s}' is unknown; choose from {', '.join(STAGES)}")
    _check(len(set(cfg.stages)) == len(cfg.stages), f"stages={cfg.stages} lists a stage twice")
    _check(cfg.data.name in DATASETS, f"data.name={cfg.data.name!r} is unknown; choose from {', '.join(DATASETS)}")
    _check(0.0 < cfg.data.test_fraction < 1.0, f"data.test_fraction={cfg.data.test_fraction} must be in (0, 1)")
    _check(cfg.data.train_limit >= 0 and cfg.data.test_limit >= 0, "data.train_limit and data.test_limit must be >= 0")
    _check(cfg.data.crop_padding >= 0, "data.crop_padding must be >= 0")
    _check(cfg.model.arch in ARCHS, f"model.arch={cfg.model.arch!r} is unknown; choose from {', '.join(ARCHS)}")
    _check(cfg.ensemble.size >= 2, f"ensemble.size={cfg.ensemble.size} must be at least 2: DVERGE needs other submodels")
    _check(cfg.vanilla.epochs >= 0, "vanilla.epochs must be >= 0")
    _check(cfg.vanilla.batch_size >= 1, "vanilla.batch_size must be >= 1")
    for stage in ("dverge", "dverge_advt"):
        d: DvergeConfig = getattr(cfg, stage)
        _check(d.epochs >= 0, f"{stage}.epochs must be >= 0")
        _check(d.batch_size >= 1, f"{stage}.batch_size must be >= 1")
        _check_eps(f"{stage}.eps", d.eps)
        _check_eps(f"{stage}.adv_eps", d.adv_eps)
        _check(d.step_size > 0 and d.adv_step_size > 0, f"{stage}.step_size and {stage}.adv_step_size must be > 0")
        _check(d.steps >= 1, f"{stage}.steps={d.steps} must be at least 1 distillation step")
        _check(d.adv_steps >= 1, f"{stage}.adv_steps={d.adv_steps} must be at least 1")
        _check(d.layer is None or d.layer >= 1, f"{stage}.layer={d.layer} must be >= 1 (layers are 1-based) or null")
        _check(d.bn_mode in BN_MODES, f"{stage}.bn_mode={d.bn_mode!r} must be one of {', '.join(BN_MODES)}")
        _check(d.momentum >= 0, f"{stage}.momentum must be >= 0")
        _check(d.engine in ENGINES, f"{stage}.engine={d.engine!r} must be one of {', '.join(ENGINES)}")
        _check(d.init_from in STAGES and d.init_from != stage,
               f"{stage}.init_from={d.init_from!r} must name another stage ({', '.join(STAGES)})")
    for stage in BASELINES:
        _validate_baseline(cfg, stage)
    for key in ("vanilla", "dverge", "dverge_advt", *BASELINES):
        o: OptimConfig = getattr(cfg, key).optim
        _check(o.name in OPTIMIZERS, f"{key}.optim.name={o.name!r} must be one of {', '.join(OPTIMIZERS)}")
        _check(o.lr > 0, f"{key}.optim.lr must be > 0")
        _check(0 <= o.momentum < 1, f"{key}.optim.momentum must be in [0, 1)")
        _check(o.eps > 0, f"{key}.optim.eps must be > 0")
    _check_eps("eval.eps", cfg.eval.eps)
    _check(cfg.eval.l2_eps >= 0, "eval.l2_eps must be >= 0")
    _check(cfg.eval.steps >= 1, f"eval.steps={cfg.eval.steps} must be at least 1")
    _check(cfg.eval.restarts >= 1, f"eval.restarts={cfg.eval.restarts} must be at least 1")
    _check(cfg.eval.restarts == 1 or cfg.eval.random_start,
           f"eval.restarts={cfg.eval.restarts} needs eval.random_start=true: restarts from one start repeat one attack")
    _check(cfg.eval.num_examples >= 0 and cfg.eval.batch_size >= 1, "eval.num_examples >= 0 and eval.batch_size >= 1")
    check_transfer_config(cfg.eval.transfer)
    _check(cfg.compute.precision in PRECISIONS,
           f"compute.precision={cfg.compute.precision!r} must be one of {', '.join(PRECISIONS)}")
    _check(cfg.logging.wandb in WANDB_MODES, f"logging.wandb={cfg.logging.wandb!r} must be one of {', '.join(WANDB_MODES)}")
    _check(cfg.dist.timeout_s >= 1, "dist.timeout_s must be >= 1")
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0: epoch ends only)")
    _check(cfg.logging.every_steps >= 1, f"logging.every_steps={cfg.logging.every_steps} must be >= 1")
    _check(cfg.vanilla.init_from is None or (cfg.vanilla.init_from in STAGES and cfg.vanilla.init_from != "vanilla"),
           f"vanilla.init_from={cfg.vanilla.init_from!r} must be null (fresh weights) or another stage")


def _validate_baseline(cfg: Config, stage: str) -> None:
    b: AdpConfig | GalConfig | TrsConfig = getattr(cfg, stage)
    _check(b.epochs >= 0, f"{stage}.epochs must be >= 0")
    _check(b.batch_size >= 2, f"{stage}.batch_size={b.batch_size} must be >= 2")
    _check(b.init_from is None or (b.init_from in STAGES and b.init_from != stage),
           f"{stage}.init_from={b.init_from!r} must be null (fresh weights) or another stage ({', '.join(STAGES)})")
    weights = {"adp": ("alpha", "beta", "log_det_jitter", "log_offset"),
               "gal": ("coherence_weight", "log_offset", "input_noise_std"),
               "trs": ("lambda_a", "lambda_b", "scale")}[stage]
    for key in weights:
        _check(getattr(b, key) >= 0, f"{stage}.{key}={getattr(b, key)} must be >= 0")
    if isinstance(b, TrsConfig):
        _check_eps(f"{stage}.init_eps", b.init_eps)
        _check_eps(f"{stage}.adv_eps", b.adv_eps)
        _check(b.pgd_steps >= 1 and b.pgd_step_fraction > 0,
               f"{stage}.pgd_steps must be >= 1 and {stage}.pgd_step_fraction > 0 (turn the PGD off with {stage}.plus_adv=false)")

"""Black-box transfer: adversarial examples crafted on a separately trained surrogate ensemble, scored
on the run's submodels and mixture (the paper's §5.2; protocol of the authors' eval/eval_bbox.py).

The surrogates are plain classifiers trained like the vanilla stage with other seeds, cached in the
run directory. Training them is training code, so it is handed in (`SurrogateTrainer`) by the
composition root; this module only loads, caches and attacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain import checkpoint, rundir
from dvtrain.config import Config, TransferConfig, to_dict
from dvtrain.data import Dataset
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.attacks import input_grad, noise, per_sample, project_linf
from dvtrain.eval.load import load_submodel_weights
from dvtrain.eval.transfer import ensemble_predictions, first, percent, shuffled_test_set
from dvtrain.mixture import Mixture
from dvtrain.rng import derive_seed, stream
from dvtrain.submodels import Owned

SURROGATE_DIR = rundir.SURROGATES
MI_PGD = "mi_pgd"  # momentum PGD (MI-FGSM's update with a random start and restarts)
M_DI2_FGSM = "m_di2_fgsm"  # momentum + diverse inputs
ALL_ATTACKS = "all"  # correct under every transferred example: the reference's "all" column


def surrogate_config(cfg: Config, tcfg: TransferConfig) -> Config:
    """The run's own architecture and vanilla recipe, with other seeds (derived from the run seed)."""
    epochs = cfg.vanilla.epochs if tcfg.surrogate_epochs is None else tcfg.surrogate_epochs
    return dataclasses.replace(
        cfg,
        seed=derive_seed(cfg.seed, "surrogate"),
        ensemble=dataclasses.replace(cfg.ensemble, size=tcfg.surrogate_size),
        vanilla=dataclasses.replace(cfg.vanilla, epochs=epochs),
    )


def _surrogate_identity(scfg: Config) -> dict:
    """What the cached weights depend on: a cache whose identity differs is retrained."""
    tree = to_dict(scfg)
    return {key: tree[key] for key in ("seed", "data", "model", "ensemble", "vanilla")}


SurrogateTrainer = Callable[[Config, Dataset, torch.device], Owned]


def load_or_train_surrogates(
    run_dir: Path, cfg: Config, tcfg: TransferConfig, data: Dataset, device: torch.device, train: SurrogateTrainer,
) -> list[nn.Module]:
    """The surrogate ensemble cached under RUN_DIR/surrogates/ (safetensors), trained on first use by
    `train(surrogate_config, data, device)`: the composition root (`dvtrain.cli`) passes the vanilla
    stage's trainer, so evaluation imports no training code."""
    scfg = surrogate_config(cfg, tcfg)
    identity = _surrogate_identity(scfg)
    path = Path(run_dir) / SURROGATE_DIR
    found = checkpoint.latest(path)
    if found is not None and checkpoint.read_state(found).get("surrogate") == identity:
        return load_submodel_weights(scfg, data, found, device)
    print(f"[eval] training the surrogate ensemble ({scfg.ensemble.size} × {scfg.model.arch}, "
          f"{scfg.vanilla.epochs} epochs) into {path}", flush=True)
    owned = train(scfg, data, device)
    state = {"surrogate": identity, "complete": True, "epoch": scfg.vanilla.epochs}
    checkpoint.save_checkpoint(path, owned, LocalPlacement(scfg.ensemble.size), state)
    return [owned.models[i].eval() for i in owned.ids]


# ----------------------------------------------------------------------------- black box: attacks


class DiverseInputs(nn.Module):
    """model(T(x)) where, with probability `prob`, T scales x down by a random factor and pads it at a
    random place (Xie et al., CVPR 2019), resized back so fixed-size models accept it; differentiable."""

    def __init__(self, model: nn.Module, prob: float, resize: float, generator: torch.Generator):
        super().__init__()
        self.model, self.prob, self.resize, self.generator = model, prob, resize, generator

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def forward(self, x: Tensor) -> Tensor:
        if float(torch.rand(1, generator=self.generator)) >= self.prob:
            return self.model(x)
        size = x.shape[-1]
        padded_size = max(size + 1, round(size * self.resize))
        inner = self._randint(size, padded_size)
        top, left = self._randint(0, padded_size - inner + 1), self._randint(0, padded_size - inner + 1)
        small = F.interpolate(x, size=(inner, inner), mode="nearest")
        padded = F.pad(small, (left, padded_size - inner - left, top, padded_size - inner - top))
        return self.model(F.interpolate(padded, size=x.shape[-2:], mode="bilinear", align_corners=False))


def momentum_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int, momentum: float,
    random_start: bool, generator: torch.Generator,
) -> Tensor:
    """MI-FGSM's update (Dong et al., CVPR 2018): accumulate per-image L1-normalised gradients with
    decay `momentum`, step along the sign of the sum, project to the L∞ ball of x."""
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = (x + (2 * noise(torch.rand, x.shape, x, generator) - 1) * eps).clamp(0.0, 1.0)
    velocity = torch.zeros_like(x)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):
        grad = input_grad(model, x_adv, y)
        velocity = momentum * velocity + grad / per_sample(grad.abs().flatten(1).sum(1).clamp_min(tiny), grad)
        x_adv = project_linf(x_adv + step_size * velocity.sign(), x, eps)
    return x_adv.detach()


def blackbox_examples(surrogates: list[nn.Module], x: Tensor, y: Tensor, cfg: TransferConfig, seed: int) -> dict[str, list[Tensor]]:
    """Adversarial copies of x crafted on the surrogate Mixture (attacked end to end): attack → one per run.

    Momentum PGD: random start, steps of ε·step_fraction, `blackbox_restarts` runs. M-DI²-FGSM: no
    random start, steps of ε/steps (as MI-FGSM and DI²-FGSM), one run."""
    surrogate = Mixture(surrogates)
    mi_step, di_step = cfg.step_fraction * cfg.eps, cfg.eps / cfg.blackbox_steps
    out: dict[str, list[Tensor]] = {MI_PGD: [], M_DI2_FGSM: []}
    for r in range(cfg.blackbox_restarts):
        g = stream(seed, "blackbox", MI_PGD, r)
        out[MI_PGD].append(_batched(lambda xb, yb: momentum_pgd(
            surrogate, xb, yb, cfg.eps, mi_step, cfg.blackbox_steps, cfg.momentum, True, g), x, y, cfg.batch_size))
    g = stream(seed, "blackbox", M_DI2_FGSM)
    diverse = DiverseInputs(surrogate, cfg.di_prob, cfg.di_resize, g)
    out[M_DI2_FGSM].append(_batched(lambda xb, yb: momentum_pgd(
        diverse, xb, yb, cfg.eps, di_step, cfg.blackbox_steps, cfg.momentum, False, g), x, y, cfg.batch_size))
    return out


def _batched(attack: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat([attack(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size)])


def blackbox_table(submodels: list[nn.Module], examples: dict[str, list[Tensor]], y: Tensor, batch_size: int) -> dict:
    """Accuracy (%) of each submodel and the mixture on the transferred examples: per attack (correct
    under all its runs) and "all" (correct under every example of every attack)."""
    correct = {
        attack: torch.stack([_predict_all(submodels, adv, batch_size) == y for adv in runs]).all(dim=0)
        for attack, runs in examples.items()
    }
    correct[ALL_ATTACKS] = torch.stack(list(correct.values())).all(dim=0)
    models = [*(f"sub{i}" for i in range(len(submodels))), "mixture"]
    return {"attacks": list(correct), "models": models, "n_images": len(y),
            "accuracy": [[percent(correct[a][m]) for a in correct] for m in range(len(models))]}


def _predict_all(submodels: list[nn.Module], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([ensemble_predictions(submodels, x[s : s + batch_size]) for s in range(0, len(x), batch_size)], dim=1)




def prepare_blackbox(
    run_dir: Path, cfg: Config, tcfg: TransferConfig, data: Dataset, device: torch.device, train: SurrogateTrainer,
) -> tuple[dict[str, list[Tensor]], dict]:
    """The transferred examples (crafted once, reused for every stage) and a description of their source:
    the surrogate mixture's clean accuracy and its own (white-box) accuracy under them."""
    x, y = first(*shuffled_test_set(data, cfg.seed), tcfg.num_images)
    surrogates = load_or_train_surrogates(run_dir, cfg, tcfg, data, device, train)
    print("[eval] crafting black-box examples on the surrogate ensemble", flush=True)
    examples = blackbox_examples(surrogates, x, y, tcfg, cfg.seed)
    own = blackbox_table(surrogates, examples, y, tcfg.batch_size)
    info = {"size": tcfg.surrogate_size, "seed": surrogate_config(cfg, tcfg).seed, "eps": tcfg.eps,
            "steps": tcfg.blackbox_steps, "restarts": tcfg.blackbox_restarts, "n_images": len(y),
            "clean_accuracy": percent(_predict_all(surrogates, x, tcfg.batch_size)[-1] == y),
            "attacks": own["attacks"], "accuracy": own["accuracy"][-1]}
    return examples, info

"""The ensemble-diversity baselines of the DVERGE paper: ADP, GAL and TRS (formulas and sources:
docs/baselines.md, values: the dataclasses of dvtrain.config).

    ADP  Σ_i CE_i − α·H(p̄) − β·log det(G + jitter·I)     p̄ = mean_i softmax(f_i(x)); G = Gram matrix of
                                                          the normalised non-true-class predictions
    GAL  mean_i CE_i + λ·log Σ_{i<j} exp(cos(g_i, g_j))   g_i = ∇_x CE_i (on noisy inputs)
    TRS  Σ_i CE_i + scale·(λ_a·mean_{i<j} |cos(g_i, g_j)| + λ_b·mean_i 2‖g̃_i‖²)   g̃_i: at points a PGD
                                                          moved to raise the gradient norms (plus_adv)

The regularisers are pure functions of per-submodel tensors stacked over all M submodels. A process
trains the submodels it owns: the others' entries are gathered as data (`with_owned`). They do not
depend on the owned parameters, so the gradient of the process's loss with respect to those parameters
is that of the full loss. Input gradients keep their graph (double backpropagation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.attacks import project_linf
from dvtrain.config import AdpConfig, GalConfig, TrsConfig
from dvtrain.data import batches
from dvtrain.distributed.placement import Placement
from dvtrain.rng import stream
from dvtrain.train.stage import Batch, Stage, StepFigures, StepResult

# ----------------------------------------------------------------------------- the regularisers


def ensemble_entropy(probs: Tensor, log_offset: float) -> Tensor:
    """H(p̄) of the mean prediction p̄ = mean_i probs[i], averaged over the batch. probs: [M, B, K]."""
    mean = probs.mean(dim=0)
    return -(mean * torch.log(mean + log_offset)).sum(dim=-1).mean()


def non_true_log_det(probs: Tensor, y: Tensor, jitter: float) -> Tensor:
    """ADP's diversity: log det of the M×M Gram matrix of each submodel's predictions over the classes
    other than the true one, each normalised to unit length; averaged over the batch."""
    num_models, batch, classes = probs.shape
    others = probs[:, F.one_hot(y, classes) == 0].reshape(num_models, batch, classes - 1)
    unit = others / others.norm(dim=-1, keepdim=True)
    gram = torch.einsum("mbk,nbk->bmn", unit, unit)
    return torch.logdet(gram + jitter * torch.eye(num_models, device=probs.device)).mean()


def _pairwise_cosines(grads: Tensor) -> Tensor:
    """cos(g_i, g_j) for every pair i < j: [pairs, B]. grads: [M, B, D]."""
    return torch.stack([F.cosine_similarity(grads[i], grads[j], dim=-1) for i, j in combinations(range(len(grads)), 2)])


def gal_coherence(grads: Tensor, log_offset: float) -> Tensor:
    """GAL's gradient alignment: log Σ_{i<j} exp(cos(g_i, g_j)), averaged over the batch."""
    return torch.log(_pairwise_cosines(grads).exp().sum(dim=0) + log_offset).mean()


def trs_cosine(grads: Tensor) -> Tensor:
    """TRS's gradient similarity: |cos(g_i, g_j)| averaged over the batch and the pairs."""
    return _pairwise_cosines(grads).abs().mean()


def trs_smoothness(grads: Tensor) -> Tensor:
    """TRS's model smoothness of each submodel: 2‖g_i‖² averaged over the batch, [M]."""
    return 2 * grads.pow(2).sum(dim=-1).mean(dim=-1)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, full_batch: int) -> tuple[Tensor, Tensor]:
    """Logits at x (which requires grad) and ∇_x of the full batch's mean CE, flattened [B, D] and
    differentiable in the weights. Dividing by the full batch size gives a replica's rows the gradients
    they have in the whole batch."""
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum") / full_batch, x, create_graph=True)
    return logits, grad.flatten(1)


def with_owned(placement: Placement, owned_values: Tensor) -> Tensor:
    """[M, ...]: the owned submodels' entries keep their graph, the others' are gathered as data."""
    every = placement.all_gather(owned_values.detach())
    ids = placement.owned  # contiguous
    return torch.cat([every[: ids[0]], owned_values, every[ids[-1] + 1 :]])


# ----------------------------------------------------------------------------- the losses


@dataclass
class BaselineTerms:
    """What a baseline's loss computes for the owned submodels (in submodel order).

    `loss`: the scalar to minimise; `logits`: [n_own] tensors [B, K] on the step's (clean) batch; `ce`:
    [n_own] their cross-entropies; `per_submodel`: name → [n_own] tensor (e.g. TRS's smoothness);
    `ensemble`: name → scalar computed from every submodel alike (e.g. ADP's entropy).
    """

    loss: Tensor
    logits: list[Tensor]
    ce: list[Tensor]
    per_submodel: dict[str, Tensor] = field(default_factory=dict)
    ensemble: dict[str, Tensor] = field(default_factory=dict)

    def result(self, y: Tensor) -> StepResult:
        """The step's result, its figures named `loss/<term>` (y: the batch's labels [B])."""
        figures = {"loss/clean": torch.stack(self.ce).detach()}
        figures.update({f"loss/{name}": values.detach() for name, values in self.per_submodel.items()})
        return StepResult(self.loss, StepFigures(figures, torch.stack(self.logits).detach(), y,
                                                 ensemble={f"loss/{k}": v.detach() for k, v in self.ensemble.items()}))


def adp_loss(models: list[nn.Module], placement: Placement, x: Tensor, y: Tensor, full_batch: int,
             cfg: AdpConfig) -> BaselineTerms:
    logits = [model(x) for model in models]
    ce = [F.cross_entropy(out, y) for out in logits]
    probs = with_owned(placement, torch.stack([F.softmax(out, dim=-1) for out in logits]))
    entropy = ensemble_entropy(probs, cfg.log_offset)
    log_det = non_true_log_det(probs, y, cfg.log_det_jitter)
    loss = sum(ce) - cfg.alpha * entropy - cfg.beta * log_det
    return BaselineTerms(loss, logits, ce, ensemble={"entropy": entropy, "log_det": log_det})


def gal_loss(models: list[nn.Module], placement: Placement, x: Tensor, y: Tensor, full_batch: int,
             cfg: GalConfig) -> BaselineTerms:
    x = x.detach().requires_grad_(True)
    logits, grads = zip(*(input_gradient(model, x, y, full_batch) for model in models))
    ce = [F.cross_entropy(out, y) for out in logits]
    coherence = gal_coherence(with_owned(placement, torch.stack(grads)), cfg.log_offset)
    loss = sum(ce) / placement.size + cfg.coherence_weight * coherence
    return BaselineTerms(loss, list(logits), ce, ensemble={"coherence": coherence})


def smoothness_pgd(
    models: list[nn.Module], placement: Placement, x: Tensor, y: Tensor, start: Tensor, eps: float, cfg: TrsConfig,
) -> Tensor:
    """TRS's perturbed points: sign-gradient ascent on Σ_i ‖∇_x CE_i‖² (every submodel's) inside the L∞
    ε-ball of x, from x + ε·start (start uniform in [−1, 1])."""
    adv = (x + eps * start).clamp(0, 1)
    for _ in range(cfg.pgd_steps):
        adv.requires_grad_(True)
        ascent = torch.stack([
            torch.autograd.grad(trs_smoothness(input_gradient(model, adv, y, len(y))[1][None]).sum(), adv)[0]
            for model in models
        ])
        direction = placement.all_gather(ascent).sum(dim=0).sign()
        adv = adv.detach() + cfg.pgd_step_fraction * eps * direction
        adv = project_linf(adv, x, eps)
    return adv.detach()


def trs_loss(
    models: list[nn.Module], placement: Placement, x: Tensor, y: Tensor, full_batch: int, cfg: TrsConfig,
    start: Tensor, split: int, eps: float,
) -> BaselineTerms:
    """`split`: the rows from which the batch's second half begins (moved by `smoothness_pgd` with +adv)."""
    x = x.detach().requires_grad_(True)
    logits, grads = zip(*(input_gradient(model, x, y, full_batch) for model in models))
    ce = [F.cross_entropy(out, y) for out in logits]
    smooth_grads = grads
    if cfg.plus_adv:
        moved = x[split:].detach()
        if len(moved):
            moved = smoothness_pgd(models, placement, moved, y[split:], start[split:], eps, cfg)
        smooth_x = torch.cat([x[:split].detach(), moved]).requires_grad_(True)
        smooth_grads = [input_gradient(model, smooth_x, y, full_batch)[1] for model in models]
    cosine = trs_cosine(with_owned(placement, torch.stack(grads)))
    smoothness = trs_smoothness(torch.stack(smooth_grads))
    loss = sum(ce) + cfg.scale * (cfg.lambda_a * cosine + cfg.lambda_b * with_owned(placement, smoothness).mean())
    return BaselineTerms(loss, list(logits), ce, per_submodel={"smoothness": smoothness}, ensemble={"cosine": cosine})


def trs_eps(cfg: TrsConfig, epoch: int) -> float:
    """The smoothness PGD's ε grows linearly from init_eps (first epoch) towards adv_eps."""
    return cfg.init_eps + (cfg.adv_eps - cfg.init_eps) * epoch / cfg.epochs


# ----------------------------------------------------------------------------- the stages


@dataclass
class NoisyBatch(Batch):
    """A baseline's batch: images x [B, C, H, W] (GAL's with its noise added), labels y [B], and for TRS the
    smoothness PGD's uniform start [B, C, H, W] and which rows it moves (the second half, [B] bool)."""

    x: Tensor
    y: Tensor
    start: Tensor | None = None
    moved: Tensor | None = None
    eps: float = 0.0  # TRS: the smoothness PGD's ε this epoch


class _Baseline(Stage):
    """A baseline stage: every process draws the same batches from `run.shared` (the regularisers couple
    the submodels on one batch) and one noise stream per step, drawn for the whole batch, so a resumed
    epoch can pass over steps and a replica's rows get what one process gives them."""

    main_loss = "loss/clean"

    def batches(self, epoch: int) -> Iterator[NoisyBatch]:
        run, cfg = self.run, self.run.section
        noise_seed = int(torch.randint(2**62, (1,), generator=run.shared))
        drawn = batches(run.data.x_train, run.data.y_train, cfg.batch_size, run.shared, run.augment_padding,
                        run.cfg.data.drop_last)
        return (self.batch(x, y, stream(noise_seed, step), epoch) for step, (x, y) in enumerate(drawn))

    def batch(self, x: Tensor, y: Tensor, noise: torch.Generator, epoch: int) -> NoisyBatch:
        return NoisyBatch(x, y)

    def step(self, batch: NoisyBatch) -> StepResult:
        for model in self.run.models:
            model.train()
        return self.loss(batch).result(batch.y)


class Adp(_Baseline):
    name = "adp"

    def loss(self, batch: NoisyBatch) -> BaselineTerms:
        return adp_loss(self.run.models, self.run.placement, batch.x, batch.y, batch.full_rows, self.run.section)


class Gal(_Baseline):
    name = "gal"

    def batch(self, x: Tensor, y: Tensor, noise: torch.Generator, epoch: int) -> NoisyBatch:
        noisy = x + self.run.section.input_noise_std * torch.randn(x.shape, generator=noise).to(x.device)
        return NoisyBatch(noisy, y)  # the reference trains on noisy images

    def loss(self, batch: NoisyBatch) -> BaselineTerms:
        return gal_loss(self.run.models, self.run.placement, batch.x, batch.y, batch.full_rows, self.run.section)


class Trs(_Baseline):
    name = "trs"

    def batch(self, x: Tensor, y: Tensor, noise: torch.Generator, epoch: int) -> NoisyBatch:
        start = torch.rand(x.shape, generator=noise).to(x.device) * 2 - 1
        moved = torch.arange(len(y)) >= len(y) // 2  # the rows the smoothness PGD moves
        return NoisyBatch(x, y, start, moved, trs_eps(self.run.section, epoch))

    def loss(self, batch: NoisyBatch) -> BaselineTerms:
        split = int((~batch.moved).sum())
        return trs_loss(self.run.models, self.run.placement, batch.x, batch.y, batch.full_rows, self.run.section,
                        batch.start, split, batch.eps)

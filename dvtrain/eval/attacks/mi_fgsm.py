"""The transfer attacks of the DVERGE paper's black-box protocol (§5, appendix): momentum PGD, M-DI²-FGSM
and SGM, each with a selectable loss (`dvtrain.attacks.LOSSES`: cross-entropy or the CW margin).

All three share one iterative update, MI-FGSM's (Dong et al., CVPR 2018): the input gradient of the loss,
L1-normalised per image, is accumulated with decay µ, and the image moves by a signed step, then is
projected back into the L∞ ε-ball and [0, 1]. They differ in what the gradient is taken of:
- momentum PGD: the model itself, from a random start (restarts are separate runs);
- M-DI²-FGSM: the model on *diverse inputs* (Xie et al., CVPR 2019), `DiverseInputs`;
- SGM: the model with the gradient through every residual branch decayed by γ (Wu et al., ICLR 2020),
  `skip_gradient`, on MI-FGSM's update as `torchattack`'s SGM does (the paper's Table 3: SGM combined
  with momentum transfers better than on I-FGSM alone).
Images are in [0, 1], ε in pixel units. Random draws come from the generator handed in (never torch's
global one), so an example set is reproducible from its seed alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.attacks import input_grad, linf_random_start, per_sample, project_linf
from dvtrain.models.resnet import BasicBlock

# Where a residual block's branch ends, per block type: the module whose output is added to the
# shortcut. Attacks know the models' structure; the models know nothing of attacks.
RESIDUAL_BRANCH_ENDS: dict[type[nn.Module], str] = {BasicBlock: "bn2"}


def momentum_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int, momentum: float,
    random_start: bool, generator: torch.Generator | None = None, loss: str = "ce",
) -> Tensor:
    """MI-FGSM's update (Dong et al., CVPR 2018, Algorithm 1): g ← µ·g + ∇/‖∇‖₁ per image; x' ← Π(x' + α·sign g).

    Args: model maps [N, C, H, W] in [0, 1] to logits or log-probabilities [N, K]; x [N, C, H, W]; y [N];
    eps the L∞ radius; step_size α; momentum µ (0: I-FGSM); random_start draws the start uniformly in the
    ε-ball from `generator`; loss one of `dvtrain.attacks.LOSSES`. Returns the adversarial images [N, C, H, W].
    """
    x = x.detach()
    x_adv = linf_random_start(x, eps, generator) if random_start else x.clone()
    velocity = torch.zeros_like(x)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):
        grad = input_grad(model, x_adv, y, loss)
        velocity = momentum * velocity + grad / per_sample(grad.abs().flatten(1).sum(1).clamp_min(tiny), grad)
        x_adv = project_linf(x_adv + step_size * velocity.sign(), x, eps)
    return x_adv.detach()


class DiverseInputs(nn.Module):
    """model(T(x)) where, with probability `prob` per call, T shrinks the batch to a random side in
    [size, resize·size) and zero-pads it at a random place to resize·size (Xie et al., CVPR 2019: 299 → 330),
    then resizes it back so that fixed-size models accept it; differentiable in x. Draws from `generator`."""

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


def residual_branch_ends(model: nn.Module) -> list[nn.Module]:
    """The modules that end a residual branch anywhere inside `model` (empty: no skip connections)."""
    return [getattr(m, RESIDUAL_BRANCH_ENDS[type(m)]) for m in model.modules() if type(m) in RESIDUAL_BRANCH_ENDS]


def scale_gradient(t: Tensor, gamma: float) -> Tensor:
    """t unchanged in value (exactly: t + γ·0), its gradient multiplied by γ on the way back."""
    frozen = t.detach()
    return frozen + gamma * (t - frozen)


@contextmanager
def skip_gradient(model: nn.Module, gamma: float) -> Iterator[int]:
    """SGM (Wu et al., "Skip connections matter", ICLR 2020, eq. 6): inside the context, the gradient through
    the residual branch f of every block z' = shortcut(z) + f(z) of `model` is multiplied by γ, so that
    ∂z'/∂z = ∂shortcut/∂z + γ·∂f/∂z and more of the gradient comes through the skip connections. Forward
    values are unchanged. Implemented by forward hooks on the branch's last module (`RESIDUAL_BRANCH_ENDS`),
    so it works whatever activation the blocks call (dvtrain's ResNet-20 uses F.relu, which the authors'
    hooks on nn.ReLU modules would miss). For a basic block this equals the authors' γ on the branch's
    ReLU: the branch is one chain, so a factor anywhere on it scales its whole contribution. Their extra
    per-block gradient normalisation by its standard deviation is one positive number per block for the
    whole batch, which MI-FGSM's per-image L1 normalisation and sign step cancel, so it is left out.
    Yields the number of hooked branches (0: SGM does not apply to this model)."""
    ends = residual_branch_ends(model)
    handles = [end.register_forward_hook(lambda module, inputs, out: scale_gradient(out, gamma)) for end in ends]
    try:
        yield len(ends)
    finally:
        for handle in handles:
            handle.remove()

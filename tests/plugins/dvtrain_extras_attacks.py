"""Two attacks defined outside dvtrain, one record each, registered by their package's entry points (group
dvtrain.attacks): a white-box one that the white-box table and the ε sweep run when eval.full_attacks /
eval.transfer.sweep_attacks name it, and a transfer one that the black-box protocol crafts on its surrogate
ensembles when eval.transfer.blackbox_attacks names it. Nothing in dvtrain/ names them."""

from __future__ import annotations

from dvtrain.eval.attacks.registry import LINF, NEVER, WhiteboxAttack
from dvtrain.eval.attacks.transfer import TransferAttack, batched


def _bim(model, x, y, eps, cfg, generator, submodels=None, placement=None):
    """The basic iterative method (Kurakin et al., ICLR 2017 workshop): PGD-L∞ from the clean image."""
    from dvtrain.attacks import pgd_linf

    return pgd_linf(model, x, y, eps, cfg.step_size, cfg.steps, False, generator, "ce")


BIM = WhiteboxAttack("bim_linf", LINF, "ce", NEVER, "BIM", perturb=_bim, passes=lambda cfg: cfg.steps,
                     budget=lambda cfg, norm: f"steps={cfg.steps},step={cfg.step_size:g}")


def _fgsm(model, x, y, loss, eps, budget, generator, batch_size):
    """One signed-gradient step of ε on the surrogate mixture (Goodfellow et al., ICLR 2015), with `loss`."""
    from dvtrain.attacks import input_grad

    return batched(lambda xb, yb: (xb + eps * input_grad(model, xb, yb, loss).sign()).clamp(0, 1), x, y, batch_size)


FGSM_TRANSFER = TransferAttack("fgsm_transfer", "FGSM", lambda t: {"steps": 1, "runs": 1}, _fgsm)

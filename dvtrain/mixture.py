"""The ensemble as one model: the mean of its submodels' predictive distributions.

DVERGE scores an ensemble by averaging the submodels' softmax probabilities. `Mixture` returns the log
of that mean, log (1/M) Σ_i softmax(f_i(x)), computed as logsumexp_i log_softmax(f_i(x)) - log M so
that confident submodels cannot overflow it. These log-probabilities already sum to one, so log_softmax
leaves them unchanged and `F.cross_entropy(mixture(x), y)` is exactly -log (1/M) Σ_i p_i(y|x): every
attack in `dvtrain.attacks` can treat the mixture as an ordinary logits model, and its input gradient
flows through all submodels at once (an end-to-end white-box attack on the whole ensemble).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.distributed.placement import LocalPlacement, Placement


def mixture_log_probs(logits: Tensor) -> Tensor:
    """Log of the mean softmax of stacked logits [M, N, K] -> [N, K], stable for any logit scale."""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


class Mixture(nn.Module):
    """Submodels f_1..f_M seen as one model whose output is log mean_i softmax(f_i(x)).

    With several processes, `submodels` are the ones this process owns and `placement` brings in the
    others' outputs; the input gradient is summed over the processes, so an attack on the mixture is
    the same end-to-end attack whatever the placement.
    """

    def __init__(self, submodels: Iterable[nn.Module], placement: Placement | None = None):
        super().__init__()
        self.submodels = nn.ModuleList(submodels)
        self.placement = placement if placement is not None else LocalPlacement(len(self.submodels))

    def forward(self, x: Tensor) -> Tensor:
        x = self.placement.share_input(x)
        owned = torch.stack([model(x) for model in self.submodels])
        return mixture_log_probs(self.placement.gather_outputs(owned))

    def mean_probs(self, x: Tensor) -> Tensor:
        """The ensemble's predictive distribution itself, for readers who want probabilities."""
        return self(x).exp()

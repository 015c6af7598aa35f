"""Every training stage, by name, in training order. Adding a stage: its class, and one line here."""

from __future__ import annotations

from dvtrain.train.baselines import Adp, Gal, Trs
from dvtrain.train.dverge import Dverge, DvergeAdvt
from dvtrain.train.stage import Stage
from dvtrain.train.vanilla import Vanilla

REGISTRY: dict[str, type[Stage]] = {
    stage.name: stage for stage in (Vanilla, Adp, Gal, Trs, Dverge, DvergeAdvt)
}

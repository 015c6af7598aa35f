"""The vulnerability-diversity matrix (dvtrain.eval.diversity): known answers on hand-made submodels,
identical submodels share every vulnerability, the same seed gives the same matrix, and `dvtrain eval`'s
results entry, heat map and markdown section."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import Tensor

from dvtrain.config import Config, DataConfig, DiversityConfig, DvergeConfig
from dvtrain.data import load_dataset
from dvtrain.eval.diversity import diversity_evaluation, diversity_matrix, diversity_plots, distillation_settings, stage_diversity
from dvtrain.eval.report import evaluation_markdown
from dvtrain.models.base import LayeredNet
from dvtrain.submodels import build_submodel

pytestmark = pytest.mark.usefixtures("one_thread")
GAIN = 5.0  # the linear submodel's logits: GAIN × pixel k for class k


class Constant(LayeredNet):
    """One layer whose output ignores the image: distillation cannot move (its gradient is exactly 0)."""

    num_layers = 1

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def layers(self, x: Tensor):
        yield self.logits + 0 * x.flatten(1).sum(1, keepdim=True)


class Linear(LayeredNet):
    """Logit k = GAIN × pixel k of a 1×1×2 image: class k is the image whose pixel k is lit."""

    num_layers = 1

    def layers(self, x: Tensor):
        yield GAIN * x.flatten(1)


def ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_matrix_on_hand_made_submodels_has_the_known_entries():
    """Targets x are the class templates, sources x_s the other class's. Constant submodel 0: its
    distilled image is x_s itself, and every image costs it CE(c, y). Linear submodel 1: with an ε of
    1 distillation walks x_s all the way to x, so f_1 reads y (CE(GAIN·x, y)); on x_s it reads the
    other class (CE(GAIN·x_s, y))."""
    templates = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])  # [2, 1, 1, 2]
    y = torch.tensor([0, 1, 1, 0])
    x, x_s = templates[y], templates[1 - y]
    c = [0.3, -0.4]
    models = [Constant(c).eval(), Linear().eval()]
    distillation = DvergeConfig(eps=1.0, step_size=0.1, steps=10, bn_mode="eval")
    matrix = diversity_matrix(models, x, y, x_s, distillation, DiversityConfig(batch_size=3), torch.Generator())
    constant_cost = sum(ce(c, int(label)) for label in y) / len(y)
    assert matrix[0][0] == pytest.approx(constant_cost, abs=1e-6)
    assert matrix[1][0] == pytest.approx(constant_cost, abs=1e-6)
    assert matrix[0][1] == pytest.approx(ce([0.0, GAIN], 0), abs=1e-5)  # f_1 on x_s: the other class
    assert matrix[1][1] == pytest.approx(ce([GAIN, 0.0], 0), abs=1e-4)  # f_1 on x: the target class
    assert matrix[1][1] < matrix[0][1]


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


def test_identical_submodels_have_equal_diagonal_and_off_diagonal(digits):
    model = build_submodel(Config(), digits, 0).eval()
    models = [model, copy.deepcopy(model)]
    x, y, x_s = digits.x_test[:20], digits.y_test[:20], digits.x_test[20:40]
    matrix = diversity_matrix(models, x, y, x_s, DvergeConfig(bn_mode="eval"), DiversityConfig(), torch.Generator().manual_seed(3))
    assert matrix[0][1] == matrix[0][0] and matrix[1][0] == matrix[1][1] and matrix[0][0] == matrix[1][1]
    assert matrix[0][0] > 0


def test_same_seed_same_matrix_and_settings_come_from_the_stage(ensemble):
    models, digits = ensemble
    cfg = Config()
    cfg.eval.diversity = DiversityConfig(num_images=30)
    cfg.dverge_advt = dataclasses.replace(cfg.dverge_advt, eps=0.05)
    first = stage_diversity("dverge_advt", models, digits, cfg)
    assert first == stage_diversity("dverge_advt", models, digits, cfg)
    assert first["protocol"]["eps"] == 0.05 and first["protocol"]["bn_mode"] == "eval"
    assert len(first["matrix"]) == 3 and all(len(row) == 3 for row in first["matrix"])
    d, metric = first["matrix"], first["metric"]
    # The DVERGE paper's eq. 2: symmetric, each off-diagonal entry the mean of the two directions.
    for i in range(3):
        for j in range(3):
            assert metric[i][j] == pytest.approx((d[i][j] + d[j][i]) / 2)
            assert metric[i][j] == metric[j][i]
        assert metric[i][i] == d[i][i]
    assert first["metric_form"] == "eq2_symmetric"
    cfg.seed = 1
    assert stage_diversity("dverge_advt", models, digits, cfg)["matrix"] != first["matrix"]
    assert distillation_settings(cfg, "vanilla").eps == cfg.dverge.eps  # stages without distillation: dverge's


def test_evaluation_writes_the_entry_the_heat_map_and_the_markdown(ensemble, tmp_path):
    models, digits = ensemble
    cfg = Config()
    cfg.eval.diversity = DiversityConfig(num_images=20, steps=2)
    results: dict = {}
    diversity_evaluation({"dverge": models}, digits, cfg, results)
    entry = results["diversity"]["dverge"]
    assert "plot" not in entry
    diversity_plots(tmp_path, results)
    assert entry["n_images"] == 20 and entry["protocol"]["steps"] == 2
    assert (tmp_path / entry["plot"]).read_bytes().startswith(b"\x89PNG")
    text = evaluation_markdown(results)
    assert "## Vulnerability diversity: dverge" in text and "Submodel 3" in text and entry["plot"] in text
    cfg.eval.diversity.enabled = False
    assert diversity_evaluation({"dverge": models}, digits, cfg, {}) is None

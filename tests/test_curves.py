"""Training curves: a run with W&B off still keeps its step history and draws, after each stage,
plots/<stage>_loss.png: each submodel's training loss and the mixture's test loss per epoch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import TINY
from dvtrain import cli, load_mixture
from dvtrain.config import load_config
from dvtrain.data import load_dataset, num_batches
from dvtrain.train.curves import loss_curves, loss_figure, read_history
from dvtrain.stages import spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCHS = {"vanilla": 2, "dverge": 2, "dverge_advt": 1}


def test_every_stage_draws_its_loss_curves_without_wandb(tmp_path):
    run = tmp_path / "run"
    epochs = [f"{stage}.epochs={n}" for stage, n in EPOCHS.items()]
    assert cli.train_main(["--run-dir", str(run), *TINY, *epochs]) == 0  # TINY: logging.wandb=disabled
    cfg = load_config(run / "config.yaml")
    data = load_dataset(cfg.data)
    for stage, n in EPOCHS.items():
        assert (run / "plots" / f"{stage}_loss.png").read_bytes()[:8] == PNG_SIGNATURE
        section = cfg.section(stage)
        main_loss = spec(stage).trainer_class().main_loss
        steps = num_batches(len(data.y_train), section.batch_size, cfg.data.drop_last)
        curves = loss_curves(read_history(run / "wandb" / f"{stage}-history.jsonl"), main_loss, steps)
        assert curves.train_epochs == curves.test_epochs == list(range(1, n + 1))
        assert sorted(curves.train) == list(range(cfg.ensemble.size))
        assert all(len(losses) == n and all(v > 0 for v in losses) for losses in curves.train.values())
        # the last test-loss point is the mixture's NLL on the test set with the stage's final weights
        mixture = load_mixture(run, stage)
        with torch.no_grad():
            nll = float(F.nll_loss(mixture(data.x_test), data.y_test))
        assert abs(curves.test[-1] - nll) < 1e-4
        # what the figure draws: one line per submodel and the mixture's, each with a point per epoch
        lines = loss_figure(curves, stage, main_loss).axes[0].get_lines()
        assert len(lines) == cfg.ensemble.size + 1
        assert [list(line.get_xdata()) for line in lines] == [list(range(1, n + 1))] * len(lines)
        assert list(lines[-1].get_ydata()) == curves.test and lines[0].get_label() == "Submodel 1: training loss"

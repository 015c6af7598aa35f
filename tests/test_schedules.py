"""Schedules and choices: the learning rate per epoch (also across a resume), the layer each epoch
distils at, and the number of distillation and PGD steps actually taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dvtrain import cli
from dvtrain.config import DvergeConfig, OptimConfig, load_config
from dvtrain.data import batches, load_dataset, paired_batches
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.errors import DvtrainError
from dvtrain.attacks import pgd_linf
from dvtrain.models import build_model
from dvtrain.rng import stream
from dvtrain.timing import DISABLED, PhaseTimer
from dvtrain.tracking import Tracker
from dvtrain.distill import distill
from dvtrain.train.baselines import NoisyBatch
from dvtrain.train.dverge import Dverge, draw_layer
from dvtrain.train.engines import GroupedEngine, LoopEngine
from dvtrain.train.optim import build_optimizer, build_owned, set_epoch_lr
from dvtrain.stages import spec
from dvtrain.train.frame import StepRunner, resumed
from dvtrain.train.stage import StageRun

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_lr_is_multiplied_by_gamma_at_each_milestone(name):
    cfg = OptimConfig(name=name, lr=0.1, milestones=[2, 4], gamma=0.5, momentum=0.7, weight_decay=0.01, eps=1e-5)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1
    assert group["weight_decay"] == 0.01
    assert (group["momentum"] if name == "sgd" else group["eps"]) == (0.7 if name == "sgd" else 1e-5)
    lrs = []
    for epoch in [0, 1, 2, 3, 4, 5, 1]:  # the last: a schedule derived from the epoch alone goes back too
        lrs.append(set_epoch_lr(optimizer, cfg, epoch))
        assert group["lr"] == lrs[-1]
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.1], rel=1e-15)


def test_resume_after_a_milestone_trains_with_the_lowered_lr(tmp_path, monkeypatch):
    """Stopped inside the epoch after the milestone, the resumed run logs and uses lr·gamma: its weights
    equal those of a run that was never stopped, and differ from a run without the milestone."""
    logged: dict[str, list] = {}
    real_init = Tracker.__init__
    crashed: list[int] = []

    class Crash(Exception):
        pass

    def init(self, cfg, run_dir, *args, **kwargs):
        real_init(self, cfg, run_dir, *args, **kwargs)
        self.run_name = run_dir.name

    def record(self, values, step):
        logged.setdefault(self.run_name, []).append((step, values))
        if self.run_name == "stopped" and step == 7 and "train/lr" not in values and not crashed:
            crashed.append(step)
            raise Crash("simulated crash at step 7, after the checkpoint of step 6")

    monkeypatch.setattr(Tracker, "__init__", init)
    monkeypatch.setattr(Tracker, "log", record)
    monkeypatch.setattr(Tracker, "log_epoch", record)  # the epoch rows (lr) take this way
    common = ["stages=[vanilla]", "vanilla.epochs=3", "vanilla.batch_size=16", "data.train_limit=64",
              "vanilla.optim.lr=0.2", "vanilla.optim.gamma=0.25", "checkpoint.every_steps=2",
              "logging.every_steps=1", "eval.num_examples=16", "eval.steps=1", "logging.wandb=disabled",
              "logging.progress=false"]
    runs = {"straight": ["vanilla.optim.milestones=[1]"], "stopped": ["vanilla.optim.milestones=[1]"],
            "flat": ["vanilla.optim.milestones=[]"]}
    for name, extra in runs.items():
        args = ["--run-dir", str(tmp_path / name), *common, *extra]
        if name == "stopped":
            with pytest.raises(Crash, match="simulated crash"):
                cli.train_main(args)
            assert cli.train_main(["--run-dir", str(tmp_path / name), "--resume"]) == 0
        else:
            assert cli.train_main(args) == 0

    def epoch_lrs(name):
        return [values["train/lr"] for _, values in logged[name] if "train/lr" in values]

    assert epoch_lrs("straight") == pytest.approx([0.2, 0.05, 0.05])
    assert epoch_lrs("stopped") == pytest.approx([0.2, 0.05, 0.05])  # epoch 2's lr logged after the resume
    assert epoch_lrs("flat") == pytest.approx([0.2, 0.2, 0.2])

    def weights(name):
        return {i: load_file(tmp_path / name / "checkpoints" / "vanilla" / f"sub{i}.safetensors") for i in range(3)}

    straight, stopped, flat = weights("straight"), weights("stopped"), weights("flat")
    for i in range(3):
        for key in straight[i]:
            assert torch.equal(straight[i][key], stopped[i][key]), key
    assert any(not torch.equal(straight[i][k], flat[i][k]) for i in range(3) for k in straight[i])


def test_each_submodel_has_its_own_noise_and_data_streams_per_stage_and_seed():
    """Streams keyed by (seed, kind, stage, submodel): submodels, stages, seeds and kinds never share one,
    and the same key gives the same stream (a resumed or re-run stage draws the same numbers)."""
    draws = {}
    for seed in (0, 1):
        cfg = load_config(None, ["data.train_limit=16", f"seed={seed}"])
        data = load_dataset(cfg.data)
        for stage in ("vanilla", "dverge"):
            owned = build_owned(cfg, data, [0, 1, 2], stage, torch.device("cpu"))
            for i in owned.ids:
                for kind, generator in (("noise", owned.generators[i]), ("data", owned.data_generators[i])):
                    assert torch.equal(generator.get_state(), stream(seed, kind, stage, i).get_state())
                    draws[(seed, stage, i, kind)] = tuple(torch.rand(4, generator=generator).tolist())
    assert len(set(draws.values())) == len(draws) == 2 * 2 * 3 * 2


# ----------------------------------------------------------------------------- layers


def test_a_fixed_layer_is_returned_without_drawing():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert draw_layer(DvergeConfig(layer=4), 5, g) == 4
    assert torch.equal(g.get_state(), state)


def test_drawn_layers_are_uniform_over_one_to_l():
    g = torch.Generator().manual_seed(0)
    num_layers, draws = 5, 10_000
    counts = torch.bincount(torch.tensor([draw_layer(DvergeConfig(), num_layers, g) for _ in range(draws)]),
                            minlength=num_layers + 2)
    assert counts[0] == 0 and counts[num_layers + 1] == 0  # only 1..L
    expected, sigma = draws / num_layers, (draws * (1 / num_layers) * (1 - 1 / num_layers)) ** 0.5
    assert all(abs(int(c) - expected) < 5 * sigma for c in counts[1 : num_layers + 1]), counts.tolist()


class RecordingEngine(LoopEngine):
    def __init__(self):
        self.calls = []

    def distill(self, models, layer, x, x_s, cfg, generators):
        self.calls.append((layer, x.clone(), x_s.clone()))
        return super().distill(models, layer, x, x_s, cfg, generators)


class OneOfThree(LocalPlacement):
    """A process that owns submodel 1 of 3; the others' distilled batches are copies of its own."""

    def __init__(self):
        super().__init__(3)
        self.owned = [1]

    def all_gather(self, owned_values):
        return owned_values.expand(3, *owned_values.shape[1:])


def _dverge_stage(*overrides, placement=None, timer=DISABLED):
    cfg = load_config(None, ["data.train_limit=64", "dverge.batch_size=32", "dverge.steps=1", *overrides])
    data = load_dataset(cfg.data)
    placement = placement or LocalPlacement(3)
    owned = build_owned(cfg, data, placement.owned, "dverge", torch.device("cpu"))
    shared = torch.Generator().manual_seed(11)
    run = StageRun("dverge", cfg, owned, placement, placement.replicas, data, shared, timer)
    stage = Dverge(run)
    stage.engine = RecordingEngine()
    return stage, data, shared


@pytest.mark.parametrize("layer, augment, one_owned", [(None, False, False), (5, True, False), (2, False, True)])
def test_the_stage_distils_every_step_of_an_epoch_at_its_layer(layer, augment, one_owned):
    """The epoch's layer (drawn, or the configured one up to the last), its batch pairs (augmented when
    asked), each step's figures and timings; also on a process that owns one submodel."""
    timer = PhaseTimer(True, torch.device("cpu"))
    stage, data, shared = _dverge_stage(f"dverge.layer={'null' if layer is None else layer}",
                                        f"data.augment={str(augment).lower()}", "data.crop_padding=2",
                                        placement=OneOfThree() if one_owned else None, timer=timer)
    start = shared.get_state()
    replay = torch.Generator().set_state(start)
    expected_layer = draw_layer(stage.run.section, 5, replay)
    pairs = list(paired_batches(data.x_train, data.y_train, 32, replay, 2 if augment else None))
    runner = StepRunner(stage, stage.run.owned, stage.run.placement, False, timer)
    steps = [runner(batch) for _, batch in resumed(stage.batches(0), 0)]
    assert stage.epoch_figures() == {"layer": expected_layer}
    if layer is not None:
        assert expected_layer == layer
    assert [call[0] for call in stage.engine.calls] == [expected_layer] * len(pairs) and len(pairs) == 2
    for (lay, x, x_s), ((xp, _), (xsp, _)) in zip(stage.engine.calls, pairs):
        assert torch.equal(x, xp) and torch.equal(x_s, xsp)
    assert [n for _, n in steps] == [32, 32]
    for step_figures, _ in steps:
        assert step_figures.per_submodel["loss/dverge"].shape == (len(stage.run.placement.owned),)
    assert set(timer.seconds) == {"distill", "all_gather", "train"}
    if augment:  # the same images as without augmentation, but cropped
        plain, _ = next(batches(data.x_train, data.y_train, 32, torch.Generator().set_state(start), None))
        assert plain.shape == pairs[0][0][0].shape and not torch.equal(plain, pairs[0][0][0])


@pytest.mark.parametrize("name, engine", [("loop", LoopEngine), ("grouped", GroupedEngine)])
def test_the_stage_runs_the_configured_engine(name, engine):
    cfg = load_config(None, ["data.train_limit=64", f"dverge.engine={name}"])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], "dverge", torch.device("cpu"))
    placement = LocalPlacement(3)
    run = StageRun("dverge", cfg, owned, placement, placement.replicas, data, torch.Generator(), DISABLED)
    assert type(Dverge(run).engine) is engine


def test_resuming_inside_an_epoch_draws_the_skipped_steps_but_trains_only_the_rest():
    stage, data, shared = _dverge_stage("dverge.layer=3")
    replay = torch.Generator().set_state(shared.get_state())
    pairs = list(paired_batches(data.x_train, data.y_train, 32, replay, None))
    runner = StepRunner(stage, stage.run.owned, stage.run.placement, False, DISABLED)
    for _, batch in resumed(stage.batches(0), 1):
        runner(batch)
    assert len(stage.engine.calls) == 1 and torch.equal(stage.engine.calls[0][1], pairs[1][0][0])
    assert torch.equal(shared.get_state(), replay.get_state())


def test_a_layer_beyond_the_model_is_refused_before_training():
    cfg = load_config(None, ["data.train_limit=64", "dverge.layer=6"])
    with pytest.raises(DvtrainError, match=r"dverge.layer=6 is out of range: conv has layers 1\.\.5"):
        cli.check_layers(cfg, load_dataset(cfg.data))


# ----------------------------------------------------------------------------- steps taken


def _model():
    torch.manual_seed(0)
    return build_model("conv", 1, 8, 10, mean=(0.5,), std=(0.25,)).double().eval()


def _images(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _hand_distill(model, layer, x, x_s, eps, step_size, steps, momentum, start):
    """Feature distillation written out: MI-FGSM descent on ‖f^l(z) − f^l(x)‖² from `start`, each
    step's gradient divided by its per-image L1 norm, projected on the ε-ball of x_s ∩ [0, 1]."""
    target = model.features(x, layer).detach()
    z, velocity = start.clone(), torch.zeros_like(x_s)
    for _ in range(steps):
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad((model.features(z, layer) - target).pow(2).sum(), z)
        if momentum > 0:
            velocity = momentum * velocity + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        else:
            velocity = grad
        z = (z.detach() - step_size * velocity.sign()).clamp(x_s - eps, x_s + eps).clamp(0, 1)
    return z.detach()


@pytest.mark.parametrize("steps", [0, 1, 4])
@pytest.mark.parametrize("momentum, random_start", [(1.0, False), (0.5, False), (0.0, True)])
def test_distillation_takes_the_configured_steps(steps, momentum, random_start):
    model = _model()
    (x, _), (x_s, _) = _images(1), _images(2)
    cfg = DvergeConfig(eps=0.1, step_size=0.03, steps=steps, momentum=momentum, random_start=random_start,
                       bn_mode="eval")
    g = torch.Generator().manual_seed(3)
    start = x_s
    if random_start:
        noise = torch.rand(x_s.shape, generator=torch.Generator().manual_seed(3), dtype=x_s.dtype)
        start = (x_s + (2 * noise - 1) * cfg.eps).clamp(0, 1)
    expected = _hand_distill(model, 3, x, x_s, cfg.eps, cfg.step_size, steps, momentum, start)
    torch.testing.assert_close(distill(model, 3, x, x_s, cfg, g), expected, rtol=0, atol=1e-12)


def _hand_pgd(model, x, y, eps, step_size, steps, start):
    adv = start.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = (adv.detach() + step_size * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
    return adv.detach()


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_pgd_takes_the_configured_steps_from_a_random_start(steps):
    model = _model()
    x, y = _images(4)
    eps, step_size = 0.1, 0.03
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    start = (x + (2 * noise - 1) * eps).clamp(0, 1)
    got = pgd_linf(model, x, y, eps, step_size, steps, random_start=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, _hand_pgd(model, x, y, eps, step_size, steps, start), rtol=0, atol=1e-12)
    no_start = pgd_linf(model, x, y, eps, step_size, steps, random_start=False)
    torch.testing.assert_close(no_start, _hand_pgd(model, x, y, eps, step_size, steps, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("skip, augment", [(0, False), (1, True)])
def test_a_baseline_epoch_trains_the_shared_batches_with_one_noise_stream_per_step(skip, augment):
    """ADP/GAL/TRS: every process draws the epoch's noise seed, then the batches (augmented when asked),
    from the shared stream; step k's random inputs come from stream(seed, k), so a resumed epoch passes
    over steps exactly."""
    cfg = load_config(None, ["data.train_limit=64", "gal.batch_size=24", f"data.augment={str(augment).lower()}",
                             "data.crop_padding=2"])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], "gal", torch.device("cpu"))
    placement = LocalPlacement(3)
    shared = torch.Generator().manual_seed(5)
    replay = torch.Generator().set_state(shared.get_state())
    stage = spec("gal").trainer_class()(StageRun("gal", cfg, owned, placement, placement.replicas, data, shared, DISABLED))
    calls, images = [], []

    def batch(x, y, noise, epoch):
        calls.append((x, y, noise.get_state(), epoch))
        return NoisyBatch(x, y)

    stage.batch = batch
    for _, drawn in resumed(stage.batches(2), skip):
        images.append(("figures", len(drawn.y)))
    assert stage.epoch_figures() == {}
    calls = calls[skip:]  # the passed-over steps are drawn too (their noise streams are their own)
    noise_seed = int(torch.randint(2**62, (1,), generator=replay))
    expected = list(batches(data.x_train, data.y_train, 24, replay, 2 if augment else None))[skip:]
    assert images == [("figures", len(y)) for _, y in expected] and [n for _, n in images] == [24, 24, 16][skip:]
    for (x, y, noise_state, epoch), (k, (xe, ye)) in zip(calls, enumerate(expected, start=skip)):
        assert torch.equal(x, xe) and torch.equal(y, ye) and epoch == 2
        assert torch.equal(noise_state, stream(noise_seed, k).get_state())
    assert torch.equal(shared.get_state(), replay.get_state())


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_distillation_uses_batch_statistics_only_in_bn_mode_train(bn_mode):
    """ResNet-20: `bn_mode` train distils with the batch's BatchNorm statistics (and updates the running
    ones, as the reference does); eval uses the running statistics and leaves them. The mode is handed back."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 8, 10, mean=(0.5,), std=(0.25,)).double().eval()
    (x, _), (x_s, _) = _images(1), _images(2)
    cfg = DvergeConfig(eps=0.1, step_size=0.03, steps=2, bn_mode=bn_mode)
    reference = build_model("resnet20", 1, 8, 10, mean=(0.5,), std=(0.25,)).double()
    reference.load_state_dict(model.state_dict())
    reference.train(bn_mode == "train")
    expected = _hand_distill(reference, 7, x, x_s, cfg.eps, cfg.step_size, cfg.steps, cfg.momentum, x_s)
    running = model.state_dict()["bn.running_mean"].clone()
    got = distill(model, 7, x, x_s, cfg, torch.Generator())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not model.training
    assert torch.equal(model.state_dict()["bn.running_mean"], running) == (bn_mode == "eval")


@pytest.mark.parametrize("momentum", [1.0, 0.0])
def test_an_image_that_already_has_the_features_is_left_where_it_is(momentum):
    """x_s = x: the feature distance is 0 with a zero gradient, so distillation does not move the image."""
    model = _model()
    x, _ = _images(1)
    cfg = DvergeConfig(eps=0.1, step_size=0.03, steps=3, momentum=momentum, bn_mode="eval")
    torch.testing.assert_close(distill(model, 2, x, x.clone(), cfg, torch.Generator()), x, rtol=0, atol=0)

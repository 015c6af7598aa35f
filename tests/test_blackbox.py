"""The black-box protocol's parts on their own: MI-FGSM, diverse inputs and SGM steps against written-out
formulas, the CW margin on logits and on the mixture's log-probabilities, the example-set cache (reused,
invalidated, exact), and surrogate ensembles as resumable vanilla-stage run directories."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY
from dvtrain import checkpoint
from dvtrain.attacks import attack_loss, margin
from dvtrain.config import TransferConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.errors import DvtrainError
from dvtrain.eval import blackbox, example_sets, surrogates
from dvtrain.eval.load import CONFIG_FILE
from dvtrain.eval.attacks.mi_fgsm import DiverseInputs, momentum_pgd, residual_branch_ends, skip_gradient
from dvtrain.mixture import Mixture, mixture_log_probs
from dvtrain.models import build_model
from dvtrain.models.resnet import ResNet20
from dvtrain.rng import stream
from dvtrain.rundir import RunDir
from dvtrain.train import loop

EPS, STEP, GAMMA = 0.05, 0.01, 0.2
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def resnet():
    torch.manual_seed(0)
    model = ResNet20(3, 10, MEAN, STD).eval()
    x = torch.rand(4, 3, 8, 8, generator=stream(0, "images"))
    return model, x, torch.tensor([0, 3, 5, 9])


# ----------------------------------------------------------------------------- MI-FGSM, DI, SGM


def test_momentum_pgd_is_the_written_out_mi_fgsm(resnet):
    """Dong et al. 2018, Algorithm 1, from a uniform start: g ← µg + ∇/‖∇‖₁, x' ← clip_ε(x' + α sign g)."""
    model, x, y = resnet
    uniform = torch.rand(x.shape, generator=stream(1, "start"))
    adv, g = (x + (2 * uniform - 1) * EPS).clamp(0, 1), torch.zeros_like(x)
    for _ in range(3):
        adv = adv.detach().requires_grad_(True)
        F.cross_entropy(model(adv), y).backward()
        g = 0.9 * g + adv.grad / adv.grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        adv = torch.min(torch.max(adv.detach() + STEP * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    ours = momentum_pgd(model, x, y, EPS, STEP, 3, 0.9, True, stream(1, "start"))
    assert torch.allclose(ours, adv, atol=1e-7)
    assert not torch.allclose(ours, momentum_pgd(model, x, y, EPS, STEP, 3, 0.0, True, stream(1, "start")))


def test_diverse_inputs_shrink_pad_and_resize_back(resnet):
    """With probability 1 the model sees x shrunk into a random window of a padded canvas, resized back."""
    _, x, _ = resnet
    seen = []
    di = DiverseInputs(lambda t: seen.append(t) or t.sum(), 1.0, 1.5, stream(2, "di"))
    di(x)
    assert seen[0].shape == x.shape and not torch.equal(seen[0], x)
    g = stream(2, "di")
    assert float(torch.rand(1, generator=g)) < 1.0
    inner = int(torch.randint(8, 12, (1,), generator=g))
    top, left = (int(torch.randint(0, 12 - inner + 1, (1,), generator=g)) for _ in range(2))
    canvas = torch.zeros(4, 3, 12, 12)
    canvas[..., top : top + inner, left : left + inner] = F.interpolate(x, size=(inner, inner), mode="nearest")
    assert torch.allclose(seen[0], F.interpolate(canvas, size=(8, 8), mode="bilinear", align_corners=False))
    never = DiverseInputs(lambda t: t, 0.0, 1.5, stream(2, "di"))
    assert torch.equal(never(x), x)


def test_skip_gradient_decays_the_residual_branch_only(resnet):
    """One block z' = shortcut(z) + f(z): SGM's input gradient is J_shortcutᵀw + γ·J_fᵀw (Wu et al. 2020, eq. 6),
    computed here from the two paths separately; forward values are unchanged; γ = 1 is the plain gradient."""
    model, _, _ = resnet
    block = model.blocks[3]  # 16 → 32 channels, stride 2: a 1×1-conv shortcut, not the identity
    z = torch.rand(2, 16, 8, 8, generator=stream(3, "z"))
    w = torch.randn(2, 32, 4, 4, generator=stream(3, "w"))

    def grad_of(fn):
        zz = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((fn(zz) * w).sum(), zz)
        return g

    shortcut = grad_of(block.shortcut)
    branch = grad_of(lambda t: block.bn2(block.conv2(F.relu(block.bn1(block.conv1(t))))))
    out = lambda t: list(block.layers(t))[-1]  # noqa: E731
    with skip_gradient(block, GAMMA) as hooked:
        assert hooked == 1
        assert torch.equal(out(z), out(z.clone()))
        sgm = grad_of(out)
    assert torch.allclose(sgm, shortcut + GAMMA * branch, atol=1e-6)
    assert torch.allclose(grad_of(out), shortcut + branch, atol=1e-6)  # hooks removed on leaving
    with skip_gradient(block, 1.0):
        assert torch.allclose(grad_of(out), shortcut + branch, atol=1e-6)


def test_sgm_on_the_whole_resnet_changes_the_gradient_not_the_output(resnet):
    model, x, y = resnet
    assert len(residual_branch_ends(model)) == 9
    plain_out = model(x)
    grad = lambda: torch.autograd.grad(F.cross_entropy(model(xx), y), xx)[0]  # noqa: E731
    xx = x.clone().requires_grad_(True)
    plain = grad()
    with skip_gradient(Mixture([model]), GAMMA):
        assert torch.equal(model(x), plain_out)
        decayed = grad()
    with skip_gradient(model, 1.0):
        assert torch.allclose(grad(), plain, atol=1e-7)
    cos = F.cosine_similarity(plain.flatten(), decayed.flatten(), dim=0)
    assert cos < 0.99 and decayed.abs().sum() > 0


def test_sgm_does_not_apply_to_the_conv_net_and_is_said_so():
    conv = build_model("conv", 1, 8, 10, (0.5,), (0.25,))
    assert residual_branch_ends(conv) == []
    attacks, notes = blackbox.applicable_attacks(TransferConfig(), [conv], "conv")
    assert attacks == ["mi_pgd", "m_di2_fgsm"] and "SGM does not apply to conv" in notes[0]


# ----------------------------------------------------------------------------- CW margin


def test_cw_margin_on_logits_and_on_the_mixtures_log_probabilities():
    logits = torch.tensor([[2.0, 5.0, 1.0], [4.0, 0.0, 3.5]])
    y = torch.tensor([0, 0])
    assert margin(logits, y).tolist() == pytest.approx([3.0, -0.5])
    # A mixture whose true class has mean probability 0.8 < 0.905: the reference's CW loss had gone flat
    # there (its best-other term was always 0); the margin of log mean probabilities keeps a gradient
    # that lowers the true class, and is positive exactly when the mixture is wrong.
    sub = torch.tensor([[[math.log(0.9), math.log(0.08), math.log(0.02)]], [[math.log(0.7), math.log(0.2), math.log(0.1)]]],
                       requires_grad=True)
    log_probs = mixture_log_probs(sub)
    assert float(log_probs.detach().exp()[0, 0]) == pytest.approx(0.8)
    loss = attack_loss(log_probs, torch.tensor([0]), "cw")
    assert float(loss.detach()) == pytest.approx(math.log(0.14) - math.log(0.8))
    (grad,) = torch.autograd.grad(loss, sub)
    assert (grad[:, 0, 0] < 0).all() and (grad[:, 0, 1] > 0).all()  # raising the loss lowers the true class


def test_cw_transfer_attack_drives_the_surrogate_mixture_below_0905(resnet):
    model, x, y = resnet
    mixture = Mixture([model, ResNet20(3, 10, MEAN, STD).eval()])
    y = mixture(x).argmax(1)  # start where the mixture is right
    adv = momentum_pgd(mixture, x, y, 0.5, 0.05, 20, 1.0, False, loss="cw")
    p_true = mixture(adv).exp().gather(1, y[:, None])
    assert (p_true < 0.905).all() and (mixture(adv).argmax(1) != y).all()


# ----------------------------------------------------------------------------- example-set cache


def test_example_sets_are_stored_exactly_reused_and_regenerated_on_a_protocol_change(tmp_path):
    calls = []

    def generate():
        calls.append(1)
        return torch.rand(2, 5, 1, 3, 3, generator=stream(len(calls), "set")) / 3  # values no 8-bit grid holds

    manifest = {"attack": "mi_pgd", "loss": "cw", "eps": 0.03, "seed": 0, "budget": {"steps": 100}}
    first = example_sets.load_or_generate(tmp_path, manifest, generate)
    path = example_sets.set_path(tmp_path, {"format": example_sets.FORMAT, **manifest})
    stamp = path.stat().st_mtime_ns
    again = example_sets.load_or_generate(tmp_path, dict(reversed(manifest.items())), generate)  # key order is irrelevant
    assert len(calls) == 1 and torch.equal(first, again) and again.dtype == torch.float32
    assert path.stat().st_mtime_ns == stamp
    assert json.loads(path.with_suffix(".json").read_text())["budget"] == {"steps": 100}
    changed = example_sets.load_or_generate(tmp_path, {**manifest, "budget": {"steps": 50}}, generate)
    assert len(calls) == 2 and not torch.equal(first, changed)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not list(tmp_path.glob("*.tmp"))
    # A manifest that does not match its file's name (edited, or half-written by a killed process) regenerates.
    path.with_suffix(".json").write_text(json.dumps({"something": "else"}))
    example_sets.load_or_generate(tmp_path, manifest, generate)
    assert len(calls) == 3


def _stored_set(tmp_path):
    manifest = {"attack": "mi_pgd", "loss": "ce", "eps": 0.1, "seed": 0, "budget": {"steps": 1}}
    calls = []

    def generate():
        calls.append(1)
        return torch.rand(1, 4, 1, 2, 2, generator=stream(7, "damaged"))

    first = example_sets.load_or_generate(tmp_path, manifest, generate)
    return manifest, generate, calls, first, example_sets.set_path(tmp_path, {"format": example_sets.FORMAT, **manifest})


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "wrong shape in the manifest", "no checksum",
                                    "manifest not JSON"])
def test_a_damaged_example_set_is_said_and_crafted_again(tmp_path, capsys, damage):
    manifest, generate, calls, first, path = _stored_set(tmp_path)
    stored = json.loads(path.with_suffix(".json").read_text())
    assert stored["shape"] == [1, 4, 1, 2, 2] and stored["dtype"] == "torch.float32" and len(stored["sha256"]) == 64
    if damage == "flip a byte":
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "manifest not JSON":
        path.with_suffix(".json").write_text('{"attack": "mi_pgd", ')
    else:
        stored = {k: v for k, v in stored.items() if k != "sha256"} if damage == "no checksum" else stored | {"shape": [2]}
        path.with_suffix(".json").write_text(json.dumps(stored))
    again = example_sets.load_or_generate(tmp_path, manifest, generate)
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    named = path.with_suffix(".json") if damage == "manifest not JSON" else path
    assert len(calls) == 2 and torch.equal(again, first) and len(lines) == 1 and str(named) in lines[0]
    example_sets.load_or_generate(tmp_path, manifest, generate)  # repaired: read, not crafted
    assert len(calls) == 2


def test_a_stored_set_beyond_its_eps_is_crafted_again_and_an_attack_beyond_eps_is_refused(tmp_path, capsys):
    """New-user finding: an ε=0.15 set copied over the ε=0.1 one, its manifest's checksum made to match, was
    scored as ε=0.1. A set is checked against its attacked images: every pixel within ε and [0, 1] (else
    said and crafted again); an attack whose fresh examples leave the ε-ball is refused and nothing stored."""
    from safetensors.torch import save_file

    clean = torch.full((4, 1, 2, 2), 0.5)
    manifest = {"attack": "mi_pgd", "loss": "ce", "eps": 0.1, "seed": 0, "budget": {"steps": 1}}
    calls = []

    def generate():
        calls.append(1)
        return (clean + 0.1 * torch.sign(torch.randn(1, *clean.shape, generator=stream(3, "ball")))).clamp(0, 1)

    first = example_sets.load_or_generate(tmp_path, manifest, generate, clean=clean)
    path = example_sets.set_path(tmp_path, {"format": example_sets.FORMAT, **manifest})
    assert example_sets.load_or_generate(tmp_path, manifest, generate, clean=clean) is not None and len(calls) == 1
    wider = clean + 0.15 * torch.sign(first - clean)  # as a set crafted at ε=0.15 would be
    save_file({example_sets.EXAMPLES: wider.contiguous()}, str(path))
    stored = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps(stored | {"sha256": example_sets.bytes_checksum(wider)}))
    again = example_sets.load_or_generate(tmp_path, manifest, generate, clean=clean)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert str(path) in line and "a pixel moved 0.15 from its image, beyond ε=0.1" in line
    assert len(calls) == 2 and torch.equal(again, first)
    other = {**manifest, "attack": "broken"}
    with pytest.raises(DvtrainError, match="transfer attack 'broken' crafted examples that are not within its ε-ball "
                                           "\\(a pixel moved 1.15 from its image, beyond ε=0.1\\); nothing was stored"):
        example_sets.load_or_generate(tmp_path, other, lambda: (clean + 0.05)[None] * 3, clean=clean)
    assert not example_sets.set_path(tmp_path, {"format": example_sets.FORMAT, **other}).exists()


def test_a_wait_on_another_evaluations_lock_says_what_it_waits_for(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(example_sets, "LOCK_NOTICE_S", 0.2)
    manifest = {"attack": "mi_pgd", "loss": "ce", "eps": 0.1, "seed": 0, "budget": {"steps": 1}}
    path = example_sets.set_path(tmp_path, {"format": example_sets.FORMAT, **manifest})
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(1.5)",
                               str(path.with_suffix(".lock"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        example_sets.load_or_generate(tmp_path, manifest, lambda: torch.zeros(1, 1, 1, 1, 1))
    finally:
        holder.wait(timeout=30)
    out = capsys.readouterr().out
    assert out.count("waiting for") == 1 and "held by another evaluation (crafting " + path.name in out


def _digits_variant(data, change: str):
    """The same Dataset with one test pixel changed, or one test label, or the same content copied."""
    x_test, y_test = data.x_test.clone(), data.y_test.clone()
    if change == "pixel":
        x_test[0, 0, 0, 0] = 1.0 - x_test[0, 0, 0, 0]
    elif change == "label":
        y_test[0] = (y_test[0] + 1) % 10
    return dataclasses.replace(data, x_test=x_test, y_test=y_test)


@pytest.mark.parametrize("change, same", [("pixel", False), ("label", False), ("copy", True)])
def test_cache_keys_follow_the_data_content_not_the_config(tmp_path, change, same):
    """Issue 26, finding 2: two data.root folders with other images (same config fields) must not share
    surrogates or example sets; the same images read from elsewhere do."""
    cfg = load_config("configs/digits_quickstart.yaml", TINY)
    data = load_dataset(cfg.data)
    other = _digits_variant(data, change)
    tcfg = TransferConfig(num_images=20)
    scfg = surrogates.surrogate_config(cfg, tcfg, 2)
    digests = [surrogates.data_digest(d) for d in (data, other)]
    dirs = [surrogates.surrogate_dir(tmp_path, scfg, d) for d in digests]
    locations = []
    for d, digest in zip((data, other), digests):
        x, y, index = blackbox.blackbox_images(d, tcfg)
        locations.append(blackbox.set_location(tmp_path, cfg, tcfg, scfg, "mi_pgd", "ce", 0.1, x, y, index, digest))
    paths = [example_sets.set_path(folder, {"format": example_sets.FORMAT, **m}) for folder, m in locations]
    assert (dirs[0] == dirs[1]) is same and (paths[0] == paths[1]) is same
    # Moving the same data elsewhere (data.root) changes nothing.
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(tmp_path / "elsewhere")))
    assert surrogates.surrogate_dir(tmp_path, surrogates.surrogate_config(moved, tcfg, 2), digests[0]) == dirs[0]


@pytest.mark.parametrize("setting", ["batch_size", "blackbox_steps", "di_prob", "momentum"])
def test_every_setting_that_feeds_an_attack_is_in_its_key(setting):
    tcfg = TransferConfig()
    value = getattr(tcfg, setting)
    other = dataclasses.replace(tcfg, **{setting: value / 2 if isinstance(value, float) else value + 7})
    assert blackbox.attack_budget("m_di2_fgsm", tcfg) != blackbox.attack_budget("m_di2_fgsm", other)
    assert blackbox.attack_budget("mi_pgd", tcfg)["batch_size"] == tcfg.batch_size


# ----------------------------------------------------------------------------- surrogates as run directories


def test_surrogate_ensembles_are_distinct_resumable_vanilla_runs(tmp_path, monkeypatch):
    cfg = load_config("configs/digits_quickstart.yaml", TINY)
    data = load_dataset(cfg.data)
    tcfg = TransferConfig(surrogate_sizes=[2, 3], surrogate_epochs=2)
    configs = [surrogates.surrogate_config(cfg, tcfg, k) for k in tcfg.surrogate_sizes]
    assert configs[0].seed != configs[1].seed != cfg.seed and configs[0].stages == ["vanilla"]
    straight = [surrogates.load_or_train(tmp_path / "a", s, data, torch.device("cpu"), loop.train_in_process) for s in configs]
    folder = surrogates.surrogate_dir(tmp_path / "a", configs[0], surrogates.data_digest(data))
    assert (folder / CONFIG_FILE).is_file() and checkpoint.latest(RunDir(folder).checkpoints("vanilla")) is not None
    firsts = [m.conv1.weight for m in straight[0]] + [m.conv1.weight for m in straight[1]]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])  # no member shared

    # Interrupted after its first epoch's checkpoint, the same call resumes and ends with the same weights.
    save, saves = checkpoint.save_checkpoint, []

    def save_then_stop(path, owned, placement, state, *rest):
        save(path, owned, placement, state, *rest)
        saves.append(state["epoch"])
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        surrogates.load_or_train(tmp_path / "b", configs[0], data, torch.device("cpu"), loop.train_in_process)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    epochs, set_lr = [], loop.set_epoch_lr
    monkeypatch.setattr(loop, "set_epoch_lr", lambda opt, optim, epoch: epochs.append(epoch) or set_lr(opt, optim, epoch))
    resumed = surrogates.load_or_train(tmp_path / "b", configs[0], data, torch.device("cpu"), loop.train_in_process)
    assert saves == [1] and set(epochs) == {1}  # only the second epoch was trained again
    for a, b in zip(straight[0], resumed):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_sgm_examples_on_a_resnet_mixture_stay_in_budget_and_differ_from_momentum_pgd(resnet):
    model, x, y = resnet
    mixture = Mixture([model, ResNet20(3, 10, MEAN, STD).eval()])
    cfg = TransferConfig(blackbox_steps=5)
    sgm = blackbox.craft(mixture, x, y, "sgm", "ce", EPS, blackbox.attack_budget("sgm", cfg), stream(4, "sgm"), 2)
    plain = blackbox.craft(mixture, x, y, "sgm", "ce", EPS, {**blackbox.attack_budget("sgm", cfg), "gamma": 1.0},
                           stream(4, "sgm"), 2)
    mi = momentum_pgd(mixture, x, y, EPS, EPS / 5, 5, 1.0, False)
    assert torch.equal(plain, mi)  # γ = 1: SGM is MI-FGSM with steps of ε/T
    assert (sgm - x).abs().max() <= EPS + 1e-6 and not torch.equal(sgm, mi)


def test_results_metrics_name_the_all_column_per_eps_and_read_the_older_layout():
    from dvtrain.eval.report import result_metrics

    new = {"models": ["sub0", "mixture"], "n_images": 10, "eps": [0.01, 0.03],
           "sets": [{"surrogate": "ens3", "attack": "mi_pgd", "loss": "ce", "eps": e} for e in (0.01, 0.03)],
           "accuracy": [[90.0, 50.0], [95.0, 60.0]], "all": [[90.0, 50.0], [95.0, 60.0]]}
    old = {"attacks": ["mi_pgd", "m_di2_fgsm", "all"], "models": ["sub0", "mixture"], "n_images": 10,
           "accuracy": [[50.0, 60.0, 40.0], [70.0, 80.0, 65.0]]}
    metrics = result_metrics({"blackbox": {"dverge": new, "vanilla": old}})
    assert metrics[("dverge", "mixture", "bb_all_eps0.03")] == 60.0 and metrics[("dverge", "sub0", "bb_all_eps0.01")] == 90.0
    assert metrics[("vanilla", "mixture", "bb_all")] == 65.0
    assert blackbox.all_accuracy(new, "mixture", 0.03) == 60.0 and blackbox.all_accuracy(new, "mixture", 0.05) is None
    assert blackbox.all_accuracy(old, "mixture", 0.03) is None


def test_the_curves_show_every_evaluated_stage_one_panel_per_surrogate_ensemble(tmp_path):
    """plots/blackbox_all.png (a panel per surrogate ensemble, then "all") and plots/whitebox_worst_case.png
    are drawn from results.json as merged, so stages evaluated by separate runs of `dvtrain eval` share them."""
    from PIL import Image

    from dvtrain.eval.blackbox_plot import FILE, WHITEBOX_FILE, add_blackbox_plot
    from dvtrain.figure_style import DPI, MAX_WIDTH_INCHES, PANEL_INCHES

    def table(level: float) -> dict:
        row = [level, level - 10, None]
        return {"models": ["sub0", "mixture"], "n_images": 200, "eps": [0.05, 0.1, 0.15], "all": [row, row],
                "all_by_surrogate": {"ens3": [row, row], "ens5": [row, row]}}

    def sweep(level: float) -> dict:
        return {"eps": [0.05, 0.1], "n_images": 200, "models": ["sub0", "mixture"], "worst_case": [[level, 1.0]] * 2}

    results = {"blackbox": {"dverge": table(60.0), "vanilla": table(40.0)},
               "eps_sweep": {"dverge": sweep(30.0), "vanilla": sweep(20.0)}}
    add_blackbox_plot(tmp_path, results, ["vanilla", "dverge"])
    for stage in ("vanilla", "dverge"):
        assert results["plots"][stage] == {"blackbox": f"plots/{FILE}", "whitebox_worst_case": f"plots/{WHITEBOX_FILE}"}
    width, height = Image.open(tmp_path / "plots" / FILE).size
    assert width <= MAX_WIDTH_INCHES * DPI and height > 2 * PANEL_INCHES[1] * DPI  # ens3, ens5, all: two rows
    assert Image.open(tmp_path / "plots" / WHITEBOX_FILE).size[0] <= MAX_WIDTH_INCHES * DPI
    assert add_blackbox_plot(tmp_path / "none", {}) is None and not (tmp_path / "none").exists()

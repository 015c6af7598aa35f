"""Configuration: defaults ← YAML ← overrides, type-checked; every shipped config loads."""

from pathlib import Path

import pytest

from dvtrain.config import ConfigError, diff_configs, dump_yaml, load_config, read_yaml, config_from_dict

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    saved = tmp_path / "c.yaml"
    saved.write_text(dump_yaml(cfg))
    assert config_from_dict(read_yaml(saved)) == cfg


def test_required_public_keys_exist():
    cfg = load_config(None, [
        "seed=3", "ensemble.size=4", "vanilla.epochs=1", "dverge.epochs=2", "dverge.eps=0.03",
        "dverge.step_size=0.01", "dverge.steps=5", "dverge.plus_adv=true", "data.name=cifar10", "data.root=/x",
    ])
    assert (cfg.seed, cfg.ensemble.size, cfg.vanilla.epochs, cfg.dverge.epochs) == (3, 4, 1, 2)
    assert (cfg.dverge.eps, cfg.dverge.step_size, cfg.dverge.steps, cfg.dverge.plus_adv) == (0.03, 0.01, 5, True)
    assert (cfg.data.name, cfg.data.root) == ("cifar10", "/x")


def test_report_config_values():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "cifar10_conv_report.yaml")
    assert cfg.model.arch == "conv" and cfg.ensemble.size == 3
    assert (cfg.vanilla.epochs, cfg.vanilla.batch_size, cfg.vanilla.optim.lr, cfg.vanilla.optim.momentum) == (30, 32, 1e-3, 0.9)
    assert (cfg.dverge.epochs, cfg.dverge.eps, cfg.dverge.steps) == (200, 8 / 255, 10)
    assert cfg.dverge_advt.epochs == 50 and cfg.dverge_advt.plus_adv
    assert (cfg.eval.eps, cfg.eval.steps, cfg.eval.step_size) == (0.03, 10, 0.007)


def test_resnet20_config_follows_reference():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "cifar10_resnet20.yaml")
    d = cfg.dverge
    assert cfg.model.arch == "resnet20" and d.batch_size == 128 and (d.eps, d.step_size, d.steps) == (0.07, 0.007, 10)
    assert not d.random_start and d.optim.lr == 0.1 and d.optim.milestones == [100, 150]
    a = cfg.dverge_advt
    assert a.plus_adv and (a.adv_eps, a.adv_step_size, a.adv_steps) == (8 / 255, 2 / 255, 10)


def test_fraction_strings_and_yaml_values():
    cfg = load_config(None, ["dverge.eps=8/255", "stages=[vanilla, dverge]", "dverge.layer=3", "model.conv_padding=null"])
    assert cfg.dverge.eps == 8 / 255 and cfg.stages == ["vanilla", "dverge"] and cfg.dverge.layer == 3
    assert cfg.vanilla.optim.lr == 1e-3  # untouched defaults stay
    assert load_config(None, ["dverge.optim.lr=1e-2"]).dverge.optim.lr == 0.01  # YAML 1.1 reads 1e-2 as a string


@pytest.mark.parametrize(
    "override, message",
    [
        ("dverge.epz=0.1", "unknown config key 'dverge.epz'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("dverge.eps=abc", "must be of type float"),
        ("dverge.steps=2.5", "must be of type int"),
        ("seed=true", "must be of type int"),
        ("dverge.plus_adv=3", "must be of type bool"),
        ("dverge.eps=-0.1", "dverge.eps=-0.1 must be in \\[0, 1\\]"),
        ("dverge.eps=1.5", "dverge.eps=1.5 must be in \\[0, 1\\]"),
        ("dverge.steps=0", "dverge.steps=0 must be >= 1"),
        ("ensemble.size=1", "ensemble.size=1 must be >= 2"),
        ("dverge.layer=0", "1-based"),
        ("data.name=mnist", "data.name='mnist' must be one of digits"),
        ("stages=[vanilla, dvrge]", "stages\\[1\\]='dvrge' must be one of"),
        ("name=../escape", "plain directory name"),
        ("dverge=3", "is a section"),
        ("dverge.eps", "not of the form key=value"),
        ("adp.init_from=adp", "adp.init_from='adp' must be null \\(fresh weights\\) or name another stage"),
        ("gal.optim.name=rmsprop", "gal.optim.name='rmsprop' must be one of sgd, adam"),
        ("trs.adv_eps=2", "trs.adv_eps=2.0 must be in \\[0, 1\\]"),
        ("trs.lambda_a=-1", "trs.lambda_a=-1.0 must be >= 0"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dverge:\n  eps: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_diff_configs_names_changed_keys():
    a = load_config(None, [])
    b = load_config(None, ["dverge.eps=0.05", "seed=2"])
    assert diff_configs(a, b) == ["dverge.eps", "seed"]


def test_baseline_configs_follow_their_references():
    root = Path(__file__).resolve().parent.parent / "configs"
    for dataset, arch in (("cifar10", "resnet20"), ("fashion_mnist", "conv")):
        adp, gal, trs = (load_config(root / f"{dataset}_{m}.yaml") for m in ("adp", "gal", "trs"))
        assert adp.model.arch == gal.model.arch == trs.model.arch == arch
        assert (adp.stages, gal.stages, trs.stages) == (["adp"], ["gal"], ["trs"])  # from scratch
        assert (adp.adp.alpha, adp.adp.beta, adp.adp.log_det_jitter, adp.adp.init_from) == (2.0, 0.5, 1e-6, None)
        assert (gal.gal.coherence_weight, gal.gal.input_noise_std) == (0.5, 0.045)
        t = trs.trs
        assert (t.lambda_a, t.lambda_b, t.scale, t.plus_adv, t.init_eps, t.adv_eps, t.pgd_steps) == (2.0, 2.0, 5.0, True, 0.1, 0.2, 6)
        for b in (adp.adp, gal.gal, trs.trs):
            assert (b.optim.name, b.optim.lr, b.optim.weight_decay, b.optim.eps, b.batch_size) == ("adam", 1e-3, 1e-4, 1e-7, 128)
    assert load_config(root / "cifar10_trs.yaml").trs.optim.milestones == [40, 80]


def test_default_stages_are_dverges_and_baselines_are_opt_in():
    cfg = load_config(None, [])
    assert cfg.stages == ["vanilla", "dverge", "dverge_advt"]
    assert load_config(None, ["stages=[vanilla, adp, gal, trs]", "adp.init_from=vanilla"]).adp.init_from == "vanilla"


def test_a_retired_key_of_an_older_run_is_ignored_with_a_note(capsys):
    """Run directories written before dvtrain dropped its own APGD still hold its keys in config.yaml."""
    cfg = load_config(None, ["eval.transfer.apgd_steps=100", "eval.transfer.eps=0.05"])
    assert cfg.eval.transfer.eps == 0.05 and not hasattr(cfg.eval.transfer, "apgd_steps")
    assert "config key 'eval.transfer.apgd_steps' is ignored: pyautoattack's APGD-CE" in capsys.readouterr().err


# Issue 19, kind 3: YAML keeps only the last of two equal keys, so a section written twice would silently
# lose the first copy's values. Every case names the key and the line(s).
DUPLICATES = {
    "section twice (the issue's example)": ("dverge:\n  eps: 0.1\nvanilla:\n  epochs: 1\ndverge:\n  epochs: 2\n",
                                            "'dverge' twice in one section (lines 1 and 5)"),
    "top-level value twice": ("seed: 1\nname: a\nseed: 2\n", "'seed' twice in one section (lines 1 and 3)"),
    "key twice inside a section": ("dverge:\n  eps: 0.1\n  steps: 3\n  eps: 0.2\n", "'eps' twice in one section (lines 2 and 4)"),
    "two levels down": ("dverge:\n  optim:\n    lr: 0.1\n    lr: 0.2\n", "'lr' twice in one section (lines 3 and 4)"),
    "flow mapping": ("dverge: {eps: 0.1, eps: 0.2}\n", "'eps' twice in one section (line 1)"),
    "quoted and plain spelling": ("seed: 1\n'seed': 2\n", "'seed' twice in one section (lines 1 and 2)"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_yaml_keys_are_refused_with_key_and_line(case, tmp_path):
    text, expected = DUPLICATES[case]
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_duplicate_keys_in_an_override_are_refused():
    with pytest.raises(ConfigError, match="names the key 'lr' twice"):
        load_config(None, ["dverge.optim={lr: 0.1, lr: 0.2}"])


def test_what_dvtrain_writes_and_yaml_merges_still_load(tmp_path):
    """The strict loader still reads every config dvtrain writes (shared objects become YAML aliases), and a
    `<<` merge whose keys a section overrides on purpose is not a duplicate."""
    cfg = load_config(None, ["dverge.optim.milestones=[3, 4]", "dverge_advt.optim.milestones=[3, 4]"])
    saved = tmp_path / "c.yaml"
    saved.write_text(dump_yaml(cfg))
    assert config_from_dict(read_yaml(saved)) == cfg
    saved.write_text("base: &b {eps: 0.1, steps: 3}\ndverge:\n  <<: *b\n  steps: 4\n")
    assert read_yaml(saved)["dverge"] == {"eps": 0.1, "steps": 4}

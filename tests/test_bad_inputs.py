"""Every user mistake of `dvtrain train`: a one-line error naming the problem and the fix, exit status 2,
no traceback, nothing already saved touched, and no new run directory left behind. (Further cases with
their own machinery: NaN loss, full disk, Ctrl-C and W&B unreachable in test_reliability.py; a refusal
under torchrun in test_distributed.py; every declared range in test_config_ranges.py; `dvtrain eval`
and `dvtrain compare`, Ctrl-C and SIGTERM in test_fail_cleanly.py.)"""

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY, write_cifar10
from dvtrain import cli


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(vanilla_run) -> Path:
    return vanilla_run  # shared with other modules: copy it before changing it


def copy_of(trained: Path, tmp_path: Path, edit_config: dict | None = None) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)
    if edit_config:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        for dotted, value in edit_config.items():
            section, key = dotted.split(".")
            cfg[section][key] = value
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def corrupt(run_dir: Path) -> Path:
    f = run_dir / "checkpoints" / "vanilla" / "sub1.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return run_dir


def fresh(tmp_path: Path) -> list[str]:
    return ["--run-dir", str(tmp_path / "new"), *TINY]


CASES = {
    "malformed YAML": (lambda t, r: ["--config", str(_file(t, "a: [1\n")), *fresh(t)], "not valid YAML at line"),
    "config names a section twice": (lambda t, r: ["--config", str(_file(t, "dverge:\n  eps: 0.1\ndverge:\n  steps: 2\n")),
                                                   *fresh(t)], "names the key 'dverge' twice in one section (lines 1 and 3)"),
    "config file missing": (lambda t, r: ["--config", str(t / "nope.yaml")], "does not exist; the configs in"),
    "config named without configs/": (lambda t, r: ["--config", "fashion_mnist_conv"],
                                      "did you mean --config configs/fashion_mnist_conv.yaml?"),
    "config name mistyped": (lambda t, r: ["--config", "configs/cifar10_resnet.yaml"],
                             "did you mean --config configs/cifar10_resnet20.yaml?"),
    "config key mistyped": (lambda t, r: [*fresh(t), "dverge.eps_step=0.01"], "unknown config key 'dverge.eps_step'; did you mean"),
    "section key mistyped": (lambda t, r: [*fresh(t), "dvrege.eps=0.01"], "unknown config key 'dvrege'; did you mean 'dverge'?"),
    "unknown key with nothing close": (lambda t, r: [*fresh(t), "zzz=1"], "the keys under '<top>' are adp, checkpoint, compute"),
    "unknown key": (lambda t, r: [*fresh(t), "dverge.epz=0.1"], "unknown config key 'dverge.epz'; did you mean 'dverge.eps'?"),
    "wrong type": (lambda t, r: [*fresh(t), "dverge.steps=ten"], "must be of type int"),
    "eps below 0": (lambda t, r: [*fresh(t), "dverge.eps=-0.1"], "dverge.eps=-0.1 must be in [0, 1]"),
    "eps above 1": (lambda t, r: [*fresh(t), "eval.eps=3"], "eval.eps=3.0 must be in [0, 1]"),
    "zero distillation steps": (lambda t, r: [*fresh(t), "dverge.steps=0"], "dverge.steps=0 must be >= 1 (distillation steps)"),
    "layer out of range": (lambda t, r: [*fresh(t), "dverge.layer=9"], "out of range: conv has layers 1..5"),
    "ensemble of one": (lambda t, r: [*fresh(t), "ensemble.size=1"], "ensemble.size=1 must be >= 2"),
    "unknown dataset": (lambda t, r: [*fresh(t), "data.name=mnist"], "must be one of digits, fashion_mnist, cifar10"),
    "run name escaping runs/": (lambda t, r: [*TINY, "name=../../etc"], "plain directory name"),
    "Fashion-MNIST missing": (lambda t, r: [*fresh(t), "data.name=fashion_mnist", f"data.root={t}"],
                              "apt-get install dataset-fashion-mnist"),
    "CIFAR-10 missing": (lambda t, r: [*fresh(t), "data.name=cifar10", f"data.root={t}"], "data.download=true"),
    "CIFAR-10 truncated": (lambda t, r: [*fresh(t), "data.name=cifar10", f"data.root={_truncated_cifar(t)}",
                                         "data.verify_checksums=false"], "truncated or corrupt"),
    "existing run directory": (lambda t, r: ["--run-dir", str(r), *TINY], "already exists; pass --resume"),
    "run directory inside a file": (lambda t, r: ["--run-dir", str(_file(t, "x") / "run"), *TINY],
                                    "file.yaml, which is a file; pass a folder"),
    "unwritable run directory": (lambda t, r: ["--run-dir", "/proc/dvtrain-test/run", *TINY],
                                 "run directory /proc/dvtrain-test/run cannot be written"),
    "nothing to resume": (lambda t, r: ["--run-dir", str(t / "none"), "--resume"], "nothing to resume"),
    "resume and overwrite": (lambda t, r: ["--run-dir", str(r), "--resume", "--overwrite"], "contradict"),
    "resume with a changed config": (lambda t, r: ["--run-dir", str(r), "--resume", "seed=5", "dverge.eps=0.01"],
                                     "differs from the saved one in dverge.eps, seed"),
    "stage without its starting weights": (lambda t, r: [*fresh(t), "stages=[dverge]"],
                                           "starts from the final weights of stage vanilla"),
    "starting stage listed after": (lambda t, r: [*fresh(t), "stages=[dverge, vanilla]"],
                                    "add vanilla to stages before dverge"),
    "resuming a stage whose start is missing": (lambda t, r: ["--run-dir", str(r), "--resume", "stages=[vanilla, dverge_advt]",
                                                                     "dverge_advt.init_from=dverge"],
                                                "stage dverge_advt starts from the final weights of stage dverge"),
    "corrupt checkpoint": (lambda t, r: ["--run-dir", str(corrupt(copy_of(r, t))), "--resume"], "corrupt or truncated"),
    "checkpoint of another architecture": (
        lambda t, r: ["--run-dir", str(copy_of(r, t, {"model.arch": "resnet20"})), "--resume"],
        "holds {'arch': 'conv', 'ensemble_size': 3}, but the config asks for {'arch': 'resnet20'"),
    "checkpoint of another ensemble size": (
        lambda t, r: ["--run-dir", str(copy_of(r, t, {"ensemble.size": 4})), "--resume"],
        "'ensemble_size': 3}, but the config asks for {'arch': 'conv', 'ensemble_size': 4}"),
    "W&B online without a key": (lambda t, r: [*fresh(t), "logging.wandb=online"], "no W&B API key is configured"),
    # numbers outside their meaning (issue 13, kind 1; every field: test_config_ranges.py)
    "negative PGD steps": (lambda t, r: [*fresh(t), "eval.step_size=-0.025", "eval.l2_step_size=-0.125"],
                           "eval.step_size=-0.025 must be > 0"),
    "learning rate not finite": (lambda t, r: [*fresh(t), "vanilla.optim.lr=nan"], "vanilla.optim.lr=nan must be a finite number > 0"),
    "budget of the sweep above 1": (lambda t, r: [*fresh(t), "eval.transfer.sweep_eps=[0.01, 2]"],
                                    "eval.transfer.sweep_eps[1]=2.0 must be in [0, 1]"),
    "infinite timeout": (lambda t, r: [*fresh(t), "logging.init_timeout_s=.inf"], "logging.init_timeout_s=inf must be a finite number"),
    # paths of the wrong kind, unreadable or damaged files (kind 2)
    "run directory is a file": (lambda t, r: ["--run-dir", str(_file(t, "x")), *TINY], "is a file, not a folder"),
    "resuming a file": (lambda t, r: ["--run-dir", str(_file(t, "x")), "--resume"], "is a file, not a folder"),
    "config is a folder": (lambda t, r: ["--config", str(t), *fresh(t)], "is a folder, not a file; pass an existing file"),
    "config is binary": (lambda t, r: ["--config", str(_binary(t)), *fresh(t)], "is not UTF-8 text"),
    "config is a list": (lambda t, r: ["--config", str(_file(t, "- 1\n- 2\n")), *fresh(t)], "must hold a mapping"),
    "Fashion-MNIST root is a file": (lambda t, r: [*fresh(t), "data.name=fashion_mnist", f"data.root={_file(t, 'x')}"],
                                     "data.root " + "{t}/file.yaml is a file, not a folder"),
    "CIFAR-10 root is a file": (lambda t, r: [*fresh(t), "data.name=cifar10", f"data.root={_file(t, 'x')}"],
                                "is a file, not a folder; point data.root at the folder"),
    "data root below a file": (lambda t, r: [*fresh(t), "data.name=fashion_mnist", f"data.root={_file(t, 'x')}/sub"],
                               "file.yaml, which is a file; point data.root at the folder"),
    "saved config is binary": (lambda t, r: ["--run-dir", str(_damage(copy_of(r, t), "config.yaml", b"\xff\xfe")), "--resume"],
                               "config.yaml is not UTF-8 text"),
    "results.json not JSON": (lambda t, r: ["--run-dir", str(_damage(copy_of(r, t), "results.json", b"{")), "--resume"],
                              "results.json is not valid JSON"),
    "results.json a list": (lambda t, r: ["--run-dir", str(_damage(copy_of(r, t), "results.json", b"[]")), "--resume"],
                            "holds a JSON list, not the object dvtrain writes"),
    "state.json not JSON": (lambda t, r: ["--run-dir", str(_damage(copy_of(r, t), STATE, b"{1")), "--resume"],
                            "state.json is not valid JSON"),
    "checkpoints is a file": (lambda t, r: ["--run-dir", str(_checkpoints_a_file(copy_of(r, t))), "--resume"],
                              "lies inside " + "{t}/copy/checkpoints, which is a file; move that file away"),
    "state.json binary": (lambda t, r: ["--run-dir", str(_damage(copy_of(r, t), STATE, b"\x80\x81")), "--resume"],
                          "state.json is not UTF-8 text"),
}
STATE = "checkpoints/vanilla/state.json"


def _checkpoints_a_file(run_dir: Path) -> Path:
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").write_text("x")
    return run_dir


def _binary(tmp_path: Path) -> Path:
    f = tmp_path / "binary.yaml"
    f.write_bytes(bytes(range(256)))
    return f


def _damage(run_dir: Path, name: str, content: bytes) -> Path:
    (run_dir / name).write_bytes(content)
    return run_dir


def _file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "file.yaml"
    f.write_text(text)
    return f


def _truncated_cifar(tmp_path: Path) -> Path:
    root = write_cifar10(tmp_path / "cifar")
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:300])
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dvtrain.data.FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    before = digest(trained)
    make_args, expected = CASES[case]
    args = make_args(tmp_path, trained)
    capsys.readouterr()
    assert cli.train_main(args) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected.replace("{t}", str(tmp_path)) in err, err
    assert err.startswith("dvtrain: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert digest(trained) == before
    assert not (tmp_path / "new").exists()  # a refused new run leaves no directory that would block the next try
    assert len(CASES) >= 40

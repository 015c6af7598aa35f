"""The command line as users of Accelerate and W&B expect it: --help, --version, --print-config,
and a note where `accelerate launch --cpu` would silently start one process."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import yaml

import dvtrain
from conftest import REPO
from dvtrain import cli
from dvtrain.config import config_from_dict, load_config


def _exit_code_and_output(args: list[str], capsys) -> tuple[int, str]:
    """What the `dvtrain` console script (`sys.exit(cli.main())`) exits with and prints."""
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    return exited.value.code, capsys.readouterr().out


def test_help_lists_every_command_and_version_prints_it(capsys):
    code, shown = _exit_code_and_output(["--help"], capsys)
    assert code == 0
    lines = shown.split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert all(len(line) <= cli.HELP_WIDTH for line in lines)  # long descriptions wrap under their command
    said: dict[str, str] = {}
    for line in lines:  # "  name     text", then continuation lines indented further
        if line[2] != " ":
            name, _, line = line.strip().partition(" ")
        said[name] = " ".join([said.get(name, ""), line.strip()]).strip()
    assert list(said) == ["train", "eval", "compare"]
    assert "ADP, GAL, TRS" in said["train"]  # the baselines train too
    for what in ("AutoAttack", "ensemble-adaptive attack", "gradient-masking checks", "transferability",
                 "black-box transfer", "ε sweep"):  # what `dvtrain eval` runs (issue 21: it said APGD)
        assert what in said["eval"], what
    assert _exit_code_and_output(["--version"], capsys) == (0, f"dvtrain {dvtrain.__version__}\n")
    for wrong in ([], ["trian"]):
        assert _exit_code_and_output(wrong, capsys)[0] == cli.EXIT_USER_ERROR


def test_print_config_prints_the_resolved_yaml_and_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "my_experiment"
    assert cli.main(["train", "--run-dir", str(run_dir), "--print-config", "dverge.eps=8/255"]) == 0
    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    expected = load_config(REPO / "configs" / "digits_quickstart.yaml", ["dverge.eps=8/255", "name=my_experiment"])
    assert printed == expected  # the name defaults to the run directory's: its W&B group
    assert not run_dir.exists()
    assert cli.main(["train", "--run-dir", str(run_dir), "--print-config", "name=shared"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "shared"  # an explicit name wins


def test_accelerate_cpu_single_process_is_noted(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    note = cli.single_cpu_process_note()
    assert "single process" in note and "--multi_gpu --num_processes N" in note and "\n" not in note
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what `accelerate launch` sets without --cpu
    assert cli.single_cpu_process_note() is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("WORLD_SIZE", "3")  # a real multi-process launch
    assert cli.single_cpu_process_note() is None


def test_eval_arguments_have_help_texts(capsys):
    code, shown = _exit_code_and_output(["eval", "--help"], capsys)
    assert code == 0 and "a run directory `dvtrain train` wrote" in shown and "evaluation overrides" in shown
    assert "95% intervals" in " ".join(shown.split()) and "%%" not in shown
    code, shown = _exit_code_and_output(["--help"], capsys)
    assert "AutoAttack" in shown and "APGD" not in shown  # eval runs pyautoattack's AutoAttack, not APGD alone


def _parsed(argv: list[str], monkeypatch) -> argparse.Namespace:
    """What `dvtrain ARGV` parsed, stopped right after parsing (nothing runs)."""
    parse = argparse.ArgumentParser.parse_intermixed_args

    def stop(self, *a, **k):
        raise _Parsed(parse(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", stop)
    with pytest.raises(_Parsed) as parsed:
        cli.main(argv)
    monkeypatch.undo()
    ns = parsed.value.args[0]
    return cli.run_dir_before_overrides(ns) if hasattr(ns, "stage") and hasattr(ns, "run_dir") else ns


class _Parsed(Exception):
    pass


# Issue 19, kind 7: options and key=value overrides in any order, as the docs write them.
ORDERS = {
    "eval: the docs' order": (["eval", "R", "--stage", "dverge", "eval.eps=0.05"],
                              {"run_dir": "R", "stage": ["dverge"], "overrides": ["eval.eps=0.05"]}),
    "eval: option first": (["eval", "--stage", "dverge", "R", "eval.eps=0.05"],
                           {"run_dir": "R", "stage": ["dverge"], "overrides": ["eval.eps=0.05"]}),
    "eval: options between overrides": (["eval", "R", "eval.eps=0.05", "--stage", "a", "eval.steps=2", "--stage", "b"],
                                        {"run_dir": "R", "stage": ["a", "b"], "overrides": ["eval.eps=0.05", "eval.steps=2"]}),
    "eval: override before the run directory": (["eval", "eval.eps=0.05", "R", "--stage", "a"],
                                                {"run_dir": "R", "stage": ["a"], "overrides": ["eval.eps=0.05"]}),
    "compare: options between runs": (["compare", "R1", "--all", "R2", "--group-by", "seed", "R3", "--stage", "dverge"],
                                      {"runs": ["R1", "R2", "R3"], "everything": True, "group_by": ["seed"],
                                       "stage": "dverge"}),
    "train: override before --run-dir": (["train", "eval.eps=0.1", "--run-dir", "X"],
                                         {"run_dir": "X", "overrides": ["eval.eps=0.1"]}),
    "train: flags between overrides": (["train", "a=1", "--resume", "b=2", "--run-dir", "X", "c=3", "--config", "f.yaml"],
                                       {"run_dir": "X", "resume": True, "config": "f.yaml", "overrides": ["a=1", "b=2", "c=3"]}),
}


@pytest.mark.parametrize("case", sorted(ORDERS))
def test_options_and_overrides_in_any_order(case, monkeypatch):
    argv, expected = ORDERS[case]
    ns = _parsed(argv, monkeypatch)
    assert {k: getattr(ns, k) for k in expected} == expected


def test_print_config_after_overrides_applies_them(tmp_path, capsys):
    run_dir = tmp_path / "x"
    assert cli.main(["train", "dverge.eps=8/255", "--run-dir", str(run_dir), "seed=4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["dverge"]["eps"] == pytest.approx(8 / 255) and printed["seed"] == 4 and printed["name"] == "x"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["compare", "--help"],
                                  ["--version"], ["train", "dverge.epz=1"]], ids=" ".join)
def test_help_version_and_a_refused_config_do_not_import_torch(argv):
    """`dvtrain --help` answers without loading torch (seconds on a small machine): torch, wandb, accelerate and
    matplotlib are imported only by the commands that use them (issue 21, item 6)."""
    code = ("import sys\nfrom dvtrain import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'wandb', 'accelerate', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr

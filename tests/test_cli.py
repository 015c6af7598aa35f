"""The command line as users of Accelerate and W&B expect it: --help, --version, --print-config,
and a note where `accelerate launch --cpu` would silently start one process."""

from __future__ import annotations

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
    listed = [line.split()[0] for line in shown.split("commands:")[1].splitlines() if line.startswith("  ")]
    assert listed == ["train", "eval", "compare"]
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

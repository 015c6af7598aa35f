"""Every numeric setting declares its valid range beside its field (`dvtrain.config.ranged`), and one
validator refuses every value outside it, and every non-finite one, with one line naming the key, the
value and the range. The cases are generated from the declarations, so a new field is covered once it
declares its range, and a numeric field that declares none fails the first test."""

import dataclasses
import math
import re
import typing

import pytest

from dvtrain import cli
from dvtrain.config import Config, ConfigError, Range, load_config


def numeric_fields(section, prefix=""):
    """(dotted key, field, type hint) of every int/float field, list of them, or Optional of them."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            yield from numeric_fields(value, f"{prefix}{f.name}.")
            continue
        if f.name == "sections":  # each stage's section, under the stage's name
            for name, stage_section in value.items():
                yield from numeric_fields(stage_section, f"{prefix}{name}.")
            continue
        base = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
        if base and base[0] in (int, float) or (typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float)):
            yield prefix + f.name, f, hint


FIELDS = {key: (f, hint) for key, f, hint in numeric_fields(Config())}


def test_every_numeric_field_declares_its_range():
    undeclared = [key for key, (f, _) in FIELDS.items() if "range" not in f.metadata]
    assert not undeclared, f"declare a range with ranged(...) for {undeclared}"
    assert len(FIELDS) > 100  # every section, nested ones (eval.transfer, each optim) included


def test_every_integer_field_is_bounded_by_what_torch_takes():
    """Issue 28, kind 10: an integer reaches torch, numpy or a random stream; above their limit it ends in an
    OverflowError traceback, so each integer field declares an upper bound (the generated cases below then
    try one above it)."""
    unbounded = [key for key, (f, hint) in FIELDS.items() if is_int(hint)
                 and f.metadata["range"].le is None and f.metadata["range"].lt is None]
    assert not unbounded, f"declare le=... (e.g. COUNT_MAX) for {unbounded}"
    for key in ("data.split_seed", "seed", "eval.transfer.seed"):
        assert FIELDS[key][0].metadata["range"].le == 2**64 - 1  # torch.Generator.manual_seed's limit


@pytest.mark.parametrize("override, expected", [
    ("data.split_seed=99999999999999999999999", "data.split_seed=99999999999999999999999 must be <= 18446744073709551615"),
    ("data.split_seed=1" + "0" * 400, "must be <= 18446744073709551615 (the largest seed torch takes)"),
    ("seed=18446744073709551616", "seed=18446744073709551616 must be <= 18446744073709551615"),
    ("vanilla.batch_size=9223372036854775808", "must be <= 9223372036854775807 (the largest integer torch takes)"),
    ("eval.transfer.surrogate_sizes=[3, 100000000000000000000]", "eval.transfer.surrogate_sizes[1]=100000000000000000000 must be <="),
    ("compute.threads=4294967296", "compute.threads=4294967296 must be <= 2147483647"),
    ("dist.timeout_s=100000000000", "dist.timeout_s=100000000000 must be in [1, 31536000] (seconds)"),
    ("eval.task_timeout_s=1e20", "eval.task_timeout_s=1e+20 must be in (0, 31536000]"),
    ("dverge.steps=0", "dverge.steps=0 must be >= 1 (distillation steps)"),  # the machinery's bound is not shown below
])
def test_numbers_beyond_the_machinery_are_one_line_refusals(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_seed_beyond_torch_is_refused_by_the_command_before_any_work(tmp_path, capsys):
    """The issue's example, from the command line: exit 2, one line, no run directory."""
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), "data.split_seed=99999999999999999999999",
                           "logging.wandb=disabled"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("dvtrain: error: data.split_seed=99999999999999999999999 must be <=") and err.count("\n") == 1
    assert not run_dir.exists()


def outside(valid: Range, is_int: bool) -> list[float]:
    """Values just outside each bound of a range."""
    step = 1 if is_int else 1e-3
    values = []
    if valid.ge is not None:
        values.append(valid.ge - step)
    if valid.gt is not None:
        values.append(valid.gt)
    if valid.le is not None:
        values.append(valid.le + step)
    if valid.lt is not None:
        values.append(valid.lt)
    return [int(v) if is_int else float(v) for v in values]


def is_int(hint) -> bool:
    return int in (typing.get_args(hint) or (hint,))


OUT_OF_RANGE = [(key, v) for key, (f, hint) in FIELDS.items() for v in outside(f.metadata["range"], is_int(hint))]
NON_FINITE = [(key, v) for key, (f, hint) in FIELDS.items() if not is_int(hint) for v in ("nan", ".inf", "-.inf")]


@pytest.mark.parametrize("key, value", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v in OUT_OF_RANGE])
def test_values_outside_the_declared_range_are_refused(key, value):
    list_field = typing.get_origin(FIELDS[key][1]) is list
    text = f"{key}=[{value}]" if list_field else f"{key}={value}"
    shown = f"{key}[0]={value!r}" if list_field else f"{key}={value!r}"
    with pytest.raises(ConfigError, match=f"^{re.escape(shown)} must be {re.escape(FIELDS[key][0].metadata['range'].describe(value))}") as info:
        load_config(None, [text])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, value", NON_FINITE, ids=[f"{k}={v}" for k, v in NON_FINITE])
def test_non_finite_values_are_refused(key, value):
    list_field = typing.get_origin(FIELDS[key][1]) is list
    text = f"{key}=[{value}]" if list_field else f"{key}={value}"
    with pytest.raises(ConfigError, match=r"=-?(nan|inf) must be a finite number") as info:
        load_config(None, [text])
    assert "\n" not in str(info.value)


def test_the_range_is_printed_as_the_user_writes_it():
    assert [str(Range(ge=0, le=1)), str(Range(gt=0)), str(Range(ge=1)), str(Range(ge=0, lt=1)), str(Range())] == [
        "in [0, 1]", "> 0", ">= 1", "in [0, 1)", "a finite number"]
    assert 0.0 in Range(ge=0, le=1) and 1.0 not in Range(ge=0, lt=1) and math.inf in Range(gt=0)


def test_a_section_given_as_a_python_object_is_checked_too():
    from dvtrain.config import TransferConfig, check_section

    with pytest.raises(ConfigError, match=r"^eval\.transfer\.di_prob=1\.5 must be in \[0, 1\] \(a probability\)$"):
        check_section(TransferConfig(di_prob=1.5), "eval.transfer.")


@pytest.mark.parametrize("overrides, message", [
    (["eval.step_size=-0.025", "eval.l2_step_size=-0.125"], "eval.step_size=-0.025 must be > 0"),
    (["eval.transfer.di_prob=1.5"], "eval.transfer.di_prob=1.5 must be in [0, 1]"),
    (["eval.transfer.sweep_eps=[]"], "eval.transfer.sweep_eps=[] must list at least one value"),
    (["eval.num_examples=-1"], "eval.num_examples=-1 must be >= 0"),
    (["eval.eps=nan"], "eval.eps=nan must be a finite number in [0, 1]"),
])
def test_dvtrain_eval_refuses_them_before_any_work(overrides, message, tmp_path, capsys):
    """The issue's example: `dvtrain eval` once reported PGD accuracy above clean accuracy with negative steps."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: r\n")
    before = sorted(p.name for p in run_dir.iterdir())
    assert cli.main(["eval", str(run_dir), *overrides]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("dvtrain: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == before

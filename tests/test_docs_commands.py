"""Every command line the README and docs/ print parses with dvtrain's own parsers (issue 19, kind 7).

The files are read when the test runs, so a command added to the docs later is checked too. Each command is
parsed, not run: the real entry point (`dvtrain.cli.main`) is called with argparse stopped right after it
parsed, and a training command's config file and key=value overrides are then built and validated as
`dvtrain train` would (`load_config`), which catches a documented key that no longer exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dvtrain import cli
from dvtrain.config import load_config

# docs/write_a_stage.md trains a plug-in stage and docs/extending.md sets a plug-in table's config section
# (eval.tables.agreement), which this process has not registered: their commands are run, in a process that
# sees the plug-ins, by test_the_write_a_stage_page_runs_as_written and test_the_extending_page_runs_as_written.
WRITE_A_STAGE = REPO / "docs" / "write_a_stage.md"
EXTENDING = REPO / "docs" / "extending.md"
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p not in (WRITE_A_STAGE, EXTENDING))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
MENTION = re.compile(r"(?:^|[\s;&|(])(?:dvtrain(?:\s+(?:train|eval|compare|--help|--version)\b)|\S*launch/train\.py\b)")
NAME_ONLY = re.compile(r"dvtrain (?:train|eval|compare)")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
OPERATORS = {"&&", "||", "|", ";", "&", "(", ")"}
SCRIPT = "launch/train.py"
LAUNCHED = "dvtrain"  # the package (`-m dvtrain`) or the console script (`--no-python dvtrain`) a launcher starts


def snippets(text: str) -> list[str]:
    """Shell text of a Markdown file: each line of a fenced block (with `\\` continuations joined) and each
    inline code span (which may wrap onto the next line) except a bare command name such as `dvtrain eval`,
    which prose uses to name the command, not to run it."""
    found = []
    for block in FENCE.findall(text):
        found += block.replace("\\\n", " ").splitlines()
    spans = [span.replace("\n", " ").strip() for span in INLINE.findall(FENCE.sub("", text))]
    found += [span for span in spans if not NAME_ONLY.fullmatch(span)]
    return [s for s in found if MENTION.search(s)]


def commands(snippet: str) -> list[list[str]]:
    """The dvtrain argument lists in one shell snippet: `dvtrain CMD ...` as given, and `[python|torchrun|
    accelerate launch ...] launch/train.py ...` as `train ...`; leading VAR=value assignments and `...`
    (the docs' "and so on") dropped. A synopsis (`[--stage S]`, alternatives with `|`) is not a command."""
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found, segment = [], []
    for token in tokens + [";"]:
        if token not in OPERATORS:
            segment.append(token)
            continue
        while segment and ENV_ASSIGNMENT.match(segment[0]):
            segment.pop(0)
        args = None
        if segment[:1] == ["dvtrain"]:
            args = segment[1:]
        elif LAUNCHED in segment and segment.index(LAUNCHED) > 0 and segment[segment.index(LAUNCHED) - 1] in ("-m", "--no-python"):
            args = segment[segment.index(LAUNCHED) + 1:]  # python -m dvtrain ..., torchrun [-m|--no-python] dvtrain ...
        elif any(t.endswith(SCRIPT) for t in segment):
            at = next(k for k, t in enumerate(segment) if t.endswith(SCRIPT))
            args = ["train", *segment[at + 1:]]
        if args is not None and not any(t.startswith("[") for t in args):
            found.append([t for t in args if t not in ("...", "…")])
        segment = []
    return found


def documented() -> list[tuple[str, list[str]]]:
    out = []
    for path in DOCS:
        for snippet in snippets(path.read_text(encoding="utf-8")):
            for args in commands(snippet):
                out.append((f"{path.relative_to(REPO)}: {shlex.join(args)}", args))
    return out


class Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
        self.prog, self.namespace = parser.prog, namespace


def test_the_extractor_finds_what_the_issue_names():
    assert commands("dvtrain eval RUN_DIR --stage dverge eval.eps=0.05  # comment") == [
        ["eval", "RUN_DIR", "--stage", "dverge", "eval.eps=0.05"]]
    assert commands("OMP_NUM_THREADS=1 torchrun --nproc_per_node W launch/train.py --run-dir R seed=1 ...") == [
        ["train", "--run-dir", "R", "seed=1"]]
    assert commands("python3 -m venv .venv && . .venv/bin/activate && python launch/train.py") == [["train"]]
    assert commands("dvtrain eval RUN_DIR [--stage S] [eval.key=value ...]") == []  # a synopsis
    assert commands("dvtrain --help | --version") == [["--help"]]  # (the second half names no command)
    assert commands("python -m dvtrain eval RUN_DIR") == [["eval", "RUN_DIR"]]
    assert commands("torchrun --nproc_per_node 2 -m dvtrain eval R --stage s") == [["eval", "R", "--stage", "s"]]
    assert commands("torchrun --nproc_per_node 2 --no-python dvtrain eval R") == [["eval", "R"]]
    assert commands("python -m dvtrain.bench --eval") == []
    assert snippets("`dvtrain eval` adds ... `dvtrain eval R --stage s`") == ["dvtrain eval R --stage s"]
    listed = [args for _, args in documented()]
    assert ["eval", "RUN_DIR", "--stage", "dverge", "eval.transfer.eps=0.05", "eval.transfer.restarts=1"] in listed
    assert len(listed) >= 20


@pytest.mark.parametrize("where,args", documented(), ids=[where for where, _ in documented()])
def test_documented_command_parses(where, args, monkeypatch, capsys):
    def stop_after(original):
        def parse(self, *a, **k):
            raise Parsed(self, original(self, *a, **k))
        return parse

    for name in ("parse_args", "parse_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, stop_after(getattr(argparse.ArgumentParser, name)))
    monkeypatch.chdir(REPO)  # the docs name configs/... relative to the repository
    try:
        cli.main(args)
    except Parsed as parsed:
        prog, ns = parsed.prog, parsed.namespace
    except SystemExit as exited:  # --help and --version exit 0; a parse error exits 2
        assert exited.code == 0, capsys.readouterr().err
        return
    else:
        pytest.fail("the command returned without parsing its arguments")
    if prog == "dvtrain train":
        load_config(ns.config or cli.default_config_path(), ns.overrides)
    elif prog == "dvtrain eval":
        assert all(o.startswith(("eval.", "device=")) for o in ns.overrides), ns.overrides
        load_config(None, ns.overrides)


@pytest.mark.slow
def test_the_write_a_stage_page_runs_as_written(tmp_path):
    """The page's shell block, run as a user would from a checkout (here: a folder whose tests/ and launch/
    are the repository's), trains its plug-in stage with 1 and 3 processes to the same weights and compares them."""
    (block,) = [b for b in FENCE.findall(WRITE_A_STAGE.read_text(encoding="utf-8")) if "dvtrain train" in b]
    for name in ("tests", "launch"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                                          os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", "-euc", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    for i in range(3):
        a, b = (load_file(tmp_path / "runs" / run / "checkpoints" / "ncl" / f"sub{i}.safetensors") for run in ("ncl", "ncl-3"))
        assert all(a[k].equal(b[k]) for k in a)
    assert json.loads((tmp_path / "runs" / "ncl" / "results.json").read_text())["stages"]["ncl"]["epochs"] == 4
    assert "ncl" in done.stdout


def test_the_extending_page_runs_as_written(tmp_path):
    """docs/extending.md's shell block, run as a user would from a checkout: its plug-in table and attacks
    (tests/plugins/dvtrain_extras_*) show in results.md and in `dvtrain compare --all`, as the page says."""
    (block,) = [b for b in FENCE.findall(EXTENDING.read_text(encoding="utf-8")) if "dvtrain eval" in b]
    for name in ("tests", "launch"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                                          os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", "-euc", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "runs" / "extras" / "results.md").read_text()
    assert "## Submodel agreement" in md and "BIM L∞" in md and "ens2 FGSM CE" in md
    assert "| vanilla | 16 |" in md  # the table's own setting, eval.tables.agreement.num_images=16
    compared = done.stdout[done.stdout.rindex("results: "):]  # after `dvtrain eval`'s last line: compare's table
    assert "agreement" in compared.split("\n", 1)[1]

"""Command line: `dvtrain train` (also `python launch/train.py`), `dvtrain eval` and `dvtrain compare`.

User mistakes surface as one line on stderr and exit status 2, printed once (by rank 0 when every rank
refuses alike); nothing already saved is touched. Ctrl-C exits 130 and SIGTERM 143, each with one line,
leaving checkpoints, results.json and caches as they were or complete. Every command checks what it
needs (config, run directory, finished stages, readable results) before it spends time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import io
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import dvtrain
from dvtrain import rundir, storage
from dvtrain.config import (Config, ConfigError, config_from_dict, diff_configs, dump_yaml, load_config,
                            parse_override, read_yaml)
from dvtrain.errors import DvtrainError, WriteFailed
from dvtrain.exits import EXIT_INTERRUPTED, EXIT_PEER_FAILED, EXIT_TERMINATED, EXIT_USER_ERROR
from dvtrain.distributed.runtime import (
    init_runtime, is_main_rank, launched_world_size, report_to_launcher, shutdown, wait_for_launcher_stop,
)
from dvtrain.rundir import RunDir
from dvtrain.paths import PathError, check_folder, check_length, read_json_object
from dvtrain.signals import StopRequested, TerminateGuard, Terminated
from dvtrain.splits import check_full_batches

if TYPE_CHECKING:
    from dvtrain.distributed.placement import Placement
# torch, and the modules that need it (checkpoint, compute, data, training, evaluation), are imported by the
# functions that use them: `dvtrain --help` and a refused config answer without loading torch.

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits_quickstart.yaml"
CONFIG_FILE = rundir.CONFIG
# Keys that may change when a run is resumed: they do not change what any stage computes
# (stages: a run may be extended by later stages).
# (compute.threads changes rounding only, as the number of processes does.)
RESUMABLE_CHANGES = ("logging.", "device", "dist.", "eval.batch_size", "stages", "compute.threads")
RESULTS_JSON = rundir.RESULTS_JSON
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out")


def peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank died, raised or hung (gloo raises RuntimeError)."""
    import torch

    return isinstance(exc, torch.distributed.DistError) or any(sign in str(exc) for sign in PEER_FAILURE_SIGNS)


def single_cpu_process_note() -> str | None:
    """A note for `accelerate launch --cpu`, which starts one process whatever --num_processes says
    (it sets ACCELERATE_USE_CPU and no rank variables)."""
    if "ACCELERATE_USE_CPU" not in os.environ or any(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return None
    return ("dvtrain: note: `accelerate launch --cpu` starts a single process whatever --num_processes says; for N CPU "
            "processes run `accelerate launch --multi_gpu --num_processes N --main_process_port 0 launch/train.py` "
            "or `torchrun --nproc_per_node N launch/train.py`")


def experiment_name(cfg: Config, run_dir: str | None, overrides: list[str]) -> Config:
    """The experiment's name (W&B group, results title) is the run directory's name unless `name=` is
    given: runs in different directories must not share a W&B group."""
    named = any(parse_override(o)[0] == "name" for o in overrides)
    if run_dir is None or named or not Path(run_dir).resolve().name:
        return cfg
    return dataclasses.replace(cfg, name=Path(run_dir).resolve().name)


def config_folder() -> Path:
    """configs/ of the working directory, else the one beside the installed package (a source checkout)."""
    return Path("configs") if Path("configs").is_dir() else REPO_CONFIGS


def check_config_path(given: str) -> Path:
    """A `--config` that does not exist is refused with the configs/ folder's names, the closest one first."""
    path = Path(given)
    try:
        check_length(path, "config file", "pass an existing YAML file with --config")
    except PathError as exc:
        raise ConfigError(str(exc)) from None
    if path.exists():
        return path
    folder = config_folder()
    names = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
    if not names:
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file with --config")
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    hint = f"did you mean --config {folder / close[0]}? " if close else ""
    raise ConfigError(f"config file {path} does not exist; {hint}the configs in {folder}/ are {', '.join(names)}")


def default_config_path() -> Path:
    for candidate in (Path("configs") / DEFAULT_CONFIG, REPO_CONFIGS / DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"default config {DEFAULT_CONFIG} not found; pass --config FILE (see configs/ in the repository)")


def _unstarted_sections(cfg: Config, run_dir: Path) -> tuple[str, ...]:
    """Config sections of the stages that have no checkpoint in the run yet: extending a run by a stage
    may configure it freely."""
    from dvtrain import checkpoint

    return tuple(
        f"{stage}."
        for stage in cfg.stages
        if checkpoint.latest(RunDir(run_dir).checkpoints(stage)) is None
    )


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, config_given: bool,
                    overrides: list[str], placement: Placement, load_data: Callable[[Config], object]):
    """Create or reopen the run directory; returns the configuration the run will use and its data.

    Every process checks, and loads the data with `load_data(cfg)` (a missing or damaged dataset is
    refused there); only the main process writes, after all have checked, so a refusal leaves no new run
    directory behind."""
    check_folder(run_dir, "run directory", "pass a folder (new or a run of dvtrain train) with --run-dir")
    saved = run_dir / CONFIG_FILE
    if resume:
        if not saved.is_file():
            raise DvtrainError(f"nothing to resume: {saved} does not exist; drop --resume to start a new run")
        saved_cfg = config_from_dict(read_yaml(saved))
        if not config_given:
            cfg = load_config(saved, overrides)
        resumable = RESUMABLE_CHANGES + _unstarted_sections(cfg, run_dir)
        changed = [k for k in diff_configs(saved_cfg, cfg) if not k.startswith(resumable)]
        if changed:
            raise DvtrainError(
                f"cannot resume {run_dir}: the config differs from the saved one in {', '.join(changed)}; "
                "resume with the saved config (drop those overrides) or start a new run directory"
            )
        check_results(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise DvtrainError(
            f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, "
            "or choose another name=... / --run-dir"
        )
    elif overwrite:
        storage.check_own_run(run_dir)
    check_run_writable(cfg, run_dir)
    check_stages_can_run(cfg, run_dir if resume else None)
    data = load_data(cfg)
    check_layers(cfg, data)
    for stage in cfg.stages:  # data-parallel replicas each need rows of every batch
        placement.replicas.check_batches(len(data.y_train), cfg.section(stage).batch_size, f"{stage}.batch_size",
                                         cfg.data.drop_last)
    check_full_batches(cfg, len(data.y_train), cfg.stages)
    placement.barrier()
    if placement.is_main:
        try:
            if overwrite and run_dir.exists():
                kept = storage.clear_run(run_dir)
                if kept:
                    print(f"dvtrain: note: --overwrite kept what dvtrain did not write in {run_dir}: {', '.join(kept)}",
                          file=sys.stderr)
            run_dir.mkdir(parents=True, exist_ok=True)
            storage.write_atomic(run_dir / CONFIG_FILE, dump_yaml(cfg), "config file")
        except OSError as exc:
            raise DvtrainError(f"cannot write to run directory {run_dir} ({exc.strerror}); choose a writable --run-dir") from None
    placement.barrier()
    return cfg, data


def check_run_writable(cfg: Config, run_dir: Path) -> None:
    """Before any work: the run directory, and the folders its W&B runs write to, take new files (a
    read-only or full file system is refused now, not after a stage trained)."""
    from dvtrain.tracking import resolve_mode

    storage.check_writable(run_dir, "run directory", "choose a writable --run-dir")
    if resolve_mode(cfg.logging) != "disabled":
        for folder, what in storage.wandb_dirs(run_dir, cfg.logging.artifacts):
            storage.check_writable(folder, what, "make it writable, point the variable elsewhere, or set logging.wandb=disabled")


def check_eval_writable(cfg: Config, run_dir: Path) -> None:
    """`dvtrain eval` writes results.json/results.md and plots/ in the run directory, the shared transfer
    cache (surrogate ensembles and example sets, eval.transfer.cache_dir) and a W&B run: refused before any
    surrogate is trained when any of them cannot be written."""
    from dvtrain.eval.surrogates import cache_root

    check_run_writable(cfg, run_dir)
    storage.check_writable(run_dir / rundir.PLOTS, "folder", f"move that away or make {run_dir} writable")
    cache = cache_root(run_dir, cfg.eval.transfer)
    try:
        storage.check_writable(cache, "transfer cache", "make it writable for you or set eval.transfer.cache_dir "
                                                         "to a folder of your own")
    except storage.StorageError:
        # A cache shared read-only (another user's, a read-only mount) still serves what it holds: what is stored
        # is read without its lock, and crafting a missing item is refused then, in one line (example_sets).
        try:
            readable = cache.is_dir() and os.access(cache, os.R_OK | os.X_OK)
        except OSError:  # a name beyond the file system's limits: the refusal above says so
            readable = False
        if not readable:
            raise
        if is_main_rank():
            print(f"dvtrain: note: the transfer cache {cache} is read-only for you: its surrogate ensembles and "
                  "example sets are read; one it lacks stops the evaluation when it is needed (set "
                  "eval.transfer.cache_dir to a folder of your own to craft)", file=sys.stderr)


def check_results(run_dir: Path) -> dict | None:
    """The run's results.json, if there is one, as the JSON object dvtrain wrote; a damaged one is refused
    before any work (training or evaluation would otherwise end by failing to extend it)."""
    path = run_dir / RESULTS_JSON
    if not path.exists():
        return None
    results = read_json_object(path, "results file", "restore it, or move it away to start a new one")
    if not isinstance(results.get("eval", []), list):
        raise PathError(f"results file {path} has no list under 'eval'; restore it, or move it away to start a new one")
    return results


def check_stages_can_run(cfg: Config, run_dir: Path | None) -> None:
    """What would stop training at the start of a stage, checked before any stage (and on every rank alike,
    so that rank 0 alone prints it): each stage's starting weights come from a stage trained earlier in
    `stages` or already finished in the run; the run's checkpoints are of this architecture and ensemble
    size; W&B can log in the mode asked for. `run_dir` None: a new run, with no checkpoints yet."""
    from dvtrain import checkpoint, prechecks
    from dvtrain.eval.attacks.registry import check_names
    from dvtrain.tracking import resolve_mode

    resolve_mode(cfg.logging)
    check_names(cfg.eval)  # the attack lists name registered attacks (plug-ins' included)
    for k, stage in enumerate(cfg.stages):
        if run_dir is not None:
            check_folder(RunDir(run_dir).checkpoints(stage), "checkpoint folder", "move that file away")
        path = prechecks.check_start(cfg, run_dir, stage, trained_before=cfg.stages[:k])
        if path is not None:  # unreadable or damaged weights: refused before config.yaml changes or work starts
            checkpoint.check_weights(path, cfg.ensemble.size)


def check_layers(cfg: Config, data) -> None:
    """A fixed distillation layer (e.g. dverge.layer) exists in the configured model."""
    import torch

    from dvtrain.models import build_model

    fixed = {stage: getattr(cfg.section(stage), "layer", None) for stage in cfg.stages}
    if not any(layer is not None for layer in fixed.values()):
        return
    with torch.random.fork_rng(devices=[]):  # the submodels' own initialisation draws stay untouched
        num_layers = build_model(cfg.model.arch, data.channels, data.image_size, data.num_classes, data.mean,
                                 data.std, cfg.model.conv_padding).num_layers
    for stage, layer in fixed.items():
        if layer is not None and layer > num_layers:
            raise DvtrainError(f"{stage}.layer={layer} is out of range: {cfg.model.arch} has layers 1..{num_layers}")


def evaluable_stages(run_dir: Path, cfg: Config, requested: list[str] | None) -> list[str]:
    """The stages `dvtrain eval` will evaluate, each with a finished, whole checkpoint; refuses when there is
    none, so that no surrogate ensemble is trained for nothing."""
    from dvtrain.eval.load import finished_stages
    from dvtrain import checkpoint

    for stage in requested or []:
        if stage not in cfg.stages:
            raise DvtrainError(f"--stage {stage} is not a stage of {run_dir} (its stages: {', '.join(cfg.stages)}); "
                               "pass one of those")
    stages = finished_stages(run_dir, cfg, requested)
    if not stages:
        raise DvtrainError(f"{run_dir} has no finished stage to evaluate (stages: {', '.join(cfg.stages)}); "
                           f"finish training first: dvtrain train --run-dir {run_dir} --resume")
    for stage in stages:
        checkpoint.check_weights(checkpoint.latest(RunDir(run_dir).checkpoints(stage)), cfg.ensemble.size)
    return stages


# OSErrors that mean the storage failed under a command (full, read-only, gone, no permission): one line, exit 2
# like every refusal (the user frees space or fixes permissions), never a traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def tell(line: str) -> None:
    """Print `line` to stderr in one write: several ranks print at once into one pipe, and print()'s
    separate write of the newline glues their lines when stderr is unbuffered (PYTHONUNBUFFERED)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def storage_failure(exc: OSError, then: str) -> int:
    """A write that failed midway (e.g. a full disk under results.json or W&B's files): one line naming the
    file and `then` (what is kept, what to do), exit 2."""
    where = f" {exc.filename}" if exc.filename else ""
    line = f"dvtrain: error: could not write{where} ({exc.strerror or exc}); free disk space or fix permissions; {then}"
    tell(line)
    report_to_launcher(line)
    return EXIT_USER_ERROR


def refuse(exc: DvtrainError, every_rank_alike: bool = True) -> int:
    """Print a refusal as one line and return exit status 2. A refusal every rank reaches alike (config,
    launch, run directory) is printed by rank 0 only, and the other ranks exit after rank 0 (they wait for
    the launcher's SIGTERM, `wait_for_launcher_stop`); every rank also hands the line to the launcher
    (torchrun's error file), so its failure summary names the problem instead of a bare exit code."""
    line = f"dvtrain: error: {exc}"
    if is_main_rank() or not every_rank_alike:
        tell(line)
    else:
        wait_for_launcher_stop()  # rank 0 exits first: its line is printed whole and is the launcher's root cause
    report_to_launcher(line)
    return EXIT_USER_ERROR


def interruptible(command: Callable[[], int], interrupted: str) -> int:
    """Run a command so that Ctrl-C (exit 130) and SIGTERM (exit 143) end it with one line, "dvtrain:
    <how>; <interrupted>", after `finally` blocks ran; refusals are one line with exit 2 (`refuse`)."""
    try:
        with TerminateGuard():
            return command()
    except DvtrainError as exc:
        return refuse(exc)
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        return storage_failure(exc, interrupted)
    except KeyboardInterrupt:
        print(f"dvtrain: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as stop:
        if is_main_rank():  # a launcher SIGTERMs the other ranks when one fails: that one's line is the news
            tell(f"dvtrain: {stop}{launcher_stop()}; {interrupted}")
        return stop.code
    except RuntimeError as exc:  # a collective broken by another rank's failure: that rank printed the news
        if not peer_failure(exc):
            raise
        tell(peer_lost(exc, interrupted))
        return EXIT_PEER_FAILED


def launcher_stop() -> str:
    """What a SIGTERM line adds in a launched run: there it usually means another rank failed, and torchrun
    stopped the others (often before they noticed the broken collective) and names that rank in its summary."""
    if launched_world_size() == 1:
        return ""
    return " (the launcher stops every rank when one fails: its summary names that rank)"


def peer_lost(exc: BaseException, then: str) -> str:
    """The line of a rank whose collective broke because another rank failed (`peer_failure`)."""
    return (f"dvtrain: error: rank {os.environ.get('RANK', '?')} lost a peer process ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); the rank that failed printed its own error; {then}")


def _context(cfg: Config, run_dir: Path, data, placement, device):
    from dvtrain.train.loop import Context

    return Context(cfg, run_dir, data, placement, device)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dvtrain train",
        description="Train an ensemble stage by stage (config `stages`: vanilla pretraining, DVERGE, DVERGE+AdvT, or "
                    "the baselines ADP, GAL, TRS), each stage followed by a quick white-box table (eval.attacks); "
                    "`dvtrain eval` runs the whole evaluation.",
    )
    parser.add_argument("--config", help=f"YAML config (default: configs/{DEFAULT_CONFIG})")
    parser.add_argument("--run-dir", help="run directory (default: <runs_dir>/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit without training")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. dverge.eps=0.03")
    args = parser.parse_intermixed_args(argv)  # options and key=value in any order, as the docs show
    started = False  # from here on a rank may fail alone, and prints its own error
    try:
        with TerminateGuard():  # SIGTERM before training unwinds too (the stage loop installs its own handler)
            if args.resume and args.overwrite:
                raise DvtrainError("--resume and --overwrite contradict each other; pass one of them")
            cfg = load_config(check_config_path(args.config) if args.config else default_config_path(), args.overrides)
            cfg = experiment_name(cfg, args.run_dir, args.overrides)
            run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.runs_dir) / cfg.name
            if args.print_config:
                if args.resume and args.config is None and (run_dir / CONFIG_FILE).is_file():
                    cfg = load_config(run_dir / CONFIG_FILE, args.overrides)
                print(dump_yaml(cfg), end="")
                return 0
            note = single_cpu_process_note()
            if note:
                print(note, file=sys.stderr)
            placement, device = init_runtime(cfg)
            try:
                from dvtrain.compute import check_compute, set_threads
                check_compute(cfg, device, launched_world_size())
                from dvtrain.data import load_dataset

                cfg, data = prepare_run_dir(
                    cfg, run_dir, args.resume, args.overwrite, args.config is not None, args.overrides, placement,
                    lambda resolved: load_dataset(resolved.data).to(device),
                )
                set_threads(cfg.compute)
                from dvtrain.train.loop import train

                started = True
                train(_context(cfg, run_dir, data, placement, device))
                placement.barrier()  # no rank tears the group down while another still uses it
            finally:
                shutdown()
        if placement.is_main:
            print(f"results: {RunDir(run_dir).results_md}", flush=True)
        return 0
    except WriteFailed as exc:
        return refuse(DvtrainError(f"{exc} with --resume"), every_rank_alike=False)
    except DvtrainError as exc:
        return refuse(exc, every_rank_alike=not started)
    except StopRequested as stop:
        print(f"dvtrain: {stop}; a checkpoint was saved there: continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("dvtrain: interrupted; the last checkpoint is kept: continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Terminated, SystemExit) as stop:  # the stage loop turns SIGTERM into SystemExit(143)
        code = stop.code
        if code != EXIT_TERMINATED:
            raise
        if is_main_rank():
            tell(f"dvtrain: stopped by SIGTERM{launcher_stop()}; the last checkpoint is kept: continue with --resume")
        return EXIT_TERMINATED
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        return storage_failure(exc, "every checkpoint written so far is kept: continue with --resume")
    except RuntimeError as exc:
        if not peer_failure(exc):
            raise
        tell(peer_lost(exc, "fix it and continue with --resume"))
        return EXIT_PEER_FAILED


OVERRIDE_FORM = re.compile(r"[A-Za-z_][\w.]*=")


def run_dir_before_overrides(args: argparse.Namespace) -> argparse.Namespace:
    """`dvtrain eval eval.eps=0.05 RUN_DIR`: argparse takes the first positional as RUN_DIR; when that one is a
    key=value override (and no such path exists) and a later one is not, the later one is the run directory."""
    def override(text: str) -> bool:
        return bool(OVERRIDE_FORM.match(text)) and not Path(text).exists()

    if override(args.run_dir):
        path = next((o for o in args.overrides if not override(o)), None)
        if path is not None:
            args.overrides = [args.run_dir] + [o for o in args.overrides if o is not path]
            args.run_dir = path
    return args


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dvtrain eval",
        description="The whole evaluation of a run's saved stages: white-box table (AutoAttack, margin PGD, the "
        "ensemble-adaptive attack, worst case per image, 95% intervals) with gradient-masking checks, "
        "transferability matrix, black-box transfer from surrogate ensembles, ε sweep, vulnerability-diversity "
        "matrix, plots.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory `dvtrain train` wrote (it holds config.yaml)")
    parser.add_argument("--stage", action="append", help="stage to evaluate (repeatable; default: every saved stage)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="evaluation overrides, e.g. eval.eps=0.01")
    args = run_dir_before_overrides(parser.parse_intermixed_args(argv))  # any order, as the docs show

    def evaluate() -> int:
        run_dir = Path(args.run_dir)
        check_folder(run_dir, "run directory", "pass the directory dvtrain train wrote")
        if not (run_dir / CONFIG_FILE).is_file():
            raise DvtrainError(f"{run_dir} is not a dvtrain run directory (no {CONFIG_FILE}); pass the directory train wrote")
        bad = [o for o in args.overrides if not o.startswith(("eval.", "device="))]
        if bad:
            raise DvtrainError(f"dvtrain eval only accepts eval.* and device overrides, got {bad[0]}")
        cfg = load_config(run_dir / CONFIG_FILE, args.overrides)
        from dvtrain.eval.attacks import transfer
        from dvtrain.eval.tables import registry

        registry.tables()  # every plug-in table and attack record loaded and checked before any output or work
        transfer.load_entry_points()
        stages = evaluable_stages(run_dir, cfg, args.stage)
        check_results(run_dir)
        from dvtrain.results import load_results

        load_results(run_dir)  # the whole store validated against its schema before any work
        check_eval_writable(cfg, run_dir)
        from dvtrain.compute import set_threads

        set_threads(cfg.compute)
        from dvtrain.eval.evaluate import full_evaluation
        from dvtrain.eval.share import ProcessGroupShare
        from dvtrain.train.loop import train_in_process

        command = " ".join(["dvtrain eval", *(sys.argv[2:] if argv is None else argv)])
        # Under a launcher every rank loads every submodel and takes its share of the test images.
        _, device = init_runtime(cfg, whole_ensemble=True)
        try:
            share = ProcessGroupShare(cfg.eval.task_timeout_s) if launched_world_size() > 1 else None
            trainer = quietly(train_in_process, bars=is_main_rank())
            full_evaluation(run_dir, cfg, stages, device, cfg.eval.transfer, trainer, command, share)
        finally:
            shutdown()
        return 0

    return interruptible(evaluate, "results.json and the surrogate cache are as they were or complete: run it again")


def quietly(train: Callable[[Path, Config, object, object], object], bars: bool) -> Callable[[Path, Config, object, object], object]:
    """A surrogate trainer that prints nothing to stdout: a surrogate ensemble's epoch lines and table are
    not the user's run (issue 29: its "### vanilla" table read as a re-scored vanilla stage); `dvtrain eval`
    announces each ensemble in one line. `bars`: keep its progress bars (on rank 0 under logging.progress;
    the other ranks' would interleave with rank 0's)."""
    def run(run_dir: Path, cfg: Config, data, device) -> object:
        quiet = cfg if bars else dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, progress=False))
        with contextlib.redirect_stdout(io.StringIO()):
            return train(run_dir, quiet, data, device)

    return run


# Bytes `dvtrain compare --plot FILE` may add to FILE's name for the charts it draws (FILE_accuracy.png, ...).
PLOT_NAME_ROOM = 32


def check_compare_outputs(argv: list[str]) -> None:
    """`--csv FILE` and `--plot FILE` of `dvtrain compare` can be written, checked before any run is read;
    no path given (runs, outputs) is longer than the file system allows."""
    for arg in argv:  # runs, W&B paths, option values: a name over NAME_MAX could name nothing
        if not arg.startswith("-"):
            check_length(arg, "path", "pass an existing run directory or a shorter output path")
    outputs = argparse.ArgumentParser(add_help=False)
    outputs.add_argument("--csv", type=Path)
    outputs.add_argument("--plot", type=Path)
    known, _ = outputs.parse_known_args(argv)
    for option, path in (("--csv", known.csv), ("--plot", known.plot)):
        if path is not None:
            check_length(path, option, "pass a shorter path", name_room=PLOT_NAME_ROOM if option == "--plot" else 0)  # --csv: a link is followed, a folder, FIFO or device refused (--plot's files: when drawn)
            target = storage.output_target(path, option) if option == "--csv" else path
            storage.check_writable(target.parent, f"{option} folder", "pass a path you can write")


def compare_main(argv: list[str]) -> int:
    def command() -> int:
        check_compare_outputs(argv)
        from dvtrain.report.compare import compare_main as compare

        return compare(argv)

    return interruptible(command, "no file was written half: run it again")


COMMANDS = {
    "train": (train_main, "train an ensemble stage by stage (vanilla, DVERGE, DVERGE+AdvT, or the baselines ADP, GAL, "
                          "TRS), with a quick white-box table (eval.attacks: FGSM, PGD) after each stage"),
    "eval": (eval_main, "the paper's whole evaluation of a run's finished stages: AutoAttack, margin PGD and the "
                        "ensemble-adaptive attack (worst case per image), gradient-masking checks, transferability, "
                        "black-box transfer from surrogate ensembles, ε sweep, vulnerability diversity, plots"),
    "compare": (compare_main, "the evaluation numbers of runs side by side: headline figures per run and stage, the "
                              "config keys they differ in; --group-by seed: mean ± s.d. over seeds"),
}
HELP_WIDTH = 100  # `dvtrain --help` wraps each command's line to this many characters


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    parser = argparse.ArgumentParser(
        prog="dvtrain",
        description="Distributed trainer for robust model ensembles with DVERGE (Yang et al., NeurIPS 2020).",
        epilog="commands:\n" + "".join(textwrap.fill(line, HELP_WIDTH, initial_indent=f"  {name:<9}",
                                                        subsequent_indent=" " * 11) + "\n"
                                          for name, (_, line) in COMMANDS.items())
        + "\n`dvtrain COMMAND --help` describes each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dvtrain {dvtrain.__version__}")
    parser.add_argument("command", choices=list(COMMANDS), help="what to do (see below)")
    parser.parse_args(argv[:1])  # prints help or the version and exits 0; exits 2 on anything else
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `dvtrain train` (also `python launch/train.py`) and `dvtrain eval`.

User mistakes surface as one line on stderr and exit status 2; nothing already saved is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from dvtrain import checkpoint
from dvtrain.compute import check_compute
from dvtrain.config import Config, ConfigError, config_from_dict, diff_configs, dump_yaml, load_config, read_yaml
from dvtrain.errors import DvtrainError
from dvtrain.distributed.placement import Placement
from dvtrain.distributed.runtime import init_runtime, launched_world_size, resolve_device, shutdown
from dvtrain.signals import StopRequested

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits_quickstart.yaml"
CONFIG_FILE = "config.yaml"
# Keys that may change when a run is resumed: they do not change what any stage computes
# (stages: a run may be extended by later stages).
RESUMABLE_CHANGES = ("logging.", "device", "dist.", "eval.batch_size", "stages")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_PEER_FAILED = 1
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out")


def peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank died, raised or hung (gloo raises RuntimeError)."""
    return isinstance(exc, torch.distributed.DistError) or any(sign in str(exc) for sign in PEER_FAILURE_SIGNS)


def default_config_path() -> Path:
    for candidate in (Path("configs") / DEFAULT_CONFIG, REPO_CONFIGS / DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"default config {DEFAULT_CONFIG} not found; pass --config FILE (see configs/ in the repository)")


def _unstarted_sections(cfg: Config, run_dir: Path) -> tuple[str, ...]:
    """Config sections of the stages that have no checkpoint in the run yet: extending a run by a stage
    may configure it freely."""
    return tuple(
        f"{stage}."
        for stage in cfg.stages
        if checkpoint.latest(checkpoint.stage_dir(run_dir, stage)) is None
    )


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, config_given: bool,
                    overrides: list[str], placement: Placement) -> Config:
    """Create or reopen the run directory; returns the configuration the run will use.

    Every process checks; only the main process writes, after all have checked."""
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
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise DvtrainError(
            f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, "
            "or choose another name=... / --run-dir"
        )
    placement.barrier()
    if placement.is_main:
        try:
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
        except OSError as exc:
            raise DvtrainError(f"cannot write to run directory {run_dir} ({exc.strerror}); choose a writable --run-dir") from None
    placement.barrier()
    return cfg


def _context(cfg: Config, run_dir: Path, placement, device):
    from dvtrain.data import load_dataset
    from dvtrain.train.loop import Context

    return Context(cfg, run_dir, load_dataset(cfg.data).to(device), placement, device)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dvtrain train",
        description="Train a DVERGE ensemble: vanilla pretraining, DVERGE, DVERGE+AdvT, then evaluation.",
    )
    parser.add_argument("--config", help=f"YAML config (default: configs/{DEFAULT_CONFIG})")
    parser.add_argument("--run-dir", help="run directory (default: <runs_dir>/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. dverge.eps=0.03")
    args = parser.parse_args(argv)
    try:
        if args.resume and args.overwrite:
            raise DvtrainError("--resume and --overwrite contradict each other; pass one of them")
        cfg = load_config(args.config or default_config_path(), args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.runs_dir) / cfg.name
        placement, device = init_runtime(cfg)
        try:
            check_compute(cfg, device, launched_world_size())
            cfg = prepare_run_dir(
                cfg, run_dir, args.resume, args.overwrite, args.config is not None, args.overrides, placement
            )
            from dvtrain.train.loop import train

            train(_context(cfg, run_dir, placement, device))
            placement.barrier()  # no rank tears the group down while another still uses it
        finally:
            shutdown()
        if placement.is_main:
            print(f"results: {run_dir / 'results.md'}", flush=True)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StopRequested as stop:
        print(f"dvtrain: {stop}; a checkpoint was saved there: continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("dvtrain: interrupted; the last checkpoint is kept: continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        if not peer_failure(exc):
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"dvtrain: error: rank {rank} lost a peer process ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "the rank that failed printed its own error; fix it and continue with --resume",
            file=sys.stderr,
        )
        return EXIT_PEER_FAILED


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dvtrain eval",
        description="The paper's whole evaluation of a run's saved stages: white-box table with APGD-CE, "
        "transferability matrix, black-box transfer from a surrogate ensemble, ε sweep, plots.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--stage", action="append", help="stage to evaluate (repeatable; default: every saved stage)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="evaluation overrides, e.g. eval.eps=0.01")
    args = parser.parse_args(argv)
    try:
        run_dir = Path(args.run_dir)
        if not (run_dir / CONFIG_FILE).is_file():
            raise DvtrainError(f"{run_dir} is not a dvtrain run directory (no {CONFIG_FILE}); pass the directory train wrote")
        bad = [o for o in args.overrides if not o.startswith(("eval.", "device="))]
        if bad:
            raise DvtrainError(f"dvtrain eval only accepts eval.* and device overrides, got {bad[0]}")
        cfg = load_config(run_dir / CONFIG_FILE, args.overrides)
        if launched_world_size() > 1:
            raise DvtrainError("dvtrain eval loads every submodel in one process; run it with python, not a launcher")
        from dvtrain.eval.transfer import full_evaluation

        full_evaluation(run_dir, cfg, args.stage, resolve_device(cfg.device), cfg.eval.transfer)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "eval": eval_main, "compare": compare_main}
    if not argv or argv[0] not in commands:
        print("usage: dvtrain {train,eval,compare} ...  (dvtrain COMMAND --help for details)", file=sys.stderr)
        return EXIT_USER_ERROR
    return commands[argv[0]](argv[1:])


def compare_main(argv: list[str]) -> int:
    from dvtrain.eval.compare import compare_main as compare

    return compare(argv)


if __name__ == "__main__":
    sys.exit(main())

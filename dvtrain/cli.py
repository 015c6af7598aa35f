"""Command line: `dvtrain train` (also `python launch/train.py`) and `dvtrain eval`.

User mistakes surface as one line on stderr and exit status 2; nothing already saved is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dvtrain.config import Config, ConfigError, config_from_dict, diff_configs, dump_yaml, load_config, read_yaml
from dvtrain.errors import DvtrainError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits_quickstart.yaml"
CONFIG_FILE = "config.yaml"
# Keys that may change when a run is resumed: they do not affect what is computed.
RESUMABLE_CHANGES = ("logging.", "device", "eval.batch_size")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def default_config_path() -> Path:
    for candidate in (Path("configs") / DEFAULT_CONFIG, REPO_CONFIGS / DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"default config {DEFAULT_CONFIG} not found; pass --config FILE (see configs/ in the repository)")


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, config_given: bool,
                    overrides: list[str]) -> Config:
    """Create or reopen the run directory; returns the configuration the run will use."""
    saved = run_dir / CONFIG_FILE
    if resume:
        if not saved.is_file():
            raise DvtrainError(f"nothing to resume: {saved} does not exist; drop --resume to start a new run")
        saved_cfg = config_from_dict(read_yaml(saved))
        if not config_given:
            cfg = load_config(saved, overrides)
        changed = [k for k in diff_configs(saved_cfg, cfg) if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise DvtrainError(
                f"cannot resume {run_dir}: the config differs from the saved one in {', '.join(changed)}; "
                "resume with the saved config (drop those overrides) or start a new run directory"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise DvtrainError(
                f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, "
                "or choose another name=... / --run-dir"
            )
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    except OSError as exc:
        raise DvtrainError(f"cannot write to run directory {run_dir} ({exc.strerror}); choose a writable --run-dir") from None
    return cfg


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DvtrainError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def _check_single_process() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise DvtrainError(
            f"launched with {world} processes, but this dvtrain build trains in one process; "
            "run `python launch/train.py ...` or launch with --num_processes 1"
        )


def _context(cfg: Config, run_dir: Path):
    from dvtrain.data import load_dataset
    from dvtrain.placement import LocalPlacement
    from dvtrain.trainer import Context

    device = resolve_device(cfg.device)
    return Context(cfg, run_dir, load_dataset(cfg.data).to(device), LocalPlacement(cfg.ensemble.size), device)


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
        _check_single_process()
        cfg = load_config(args.config or default_config_path(), args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.runs_dir) / cfg.name
        cfg = prepare_run_dir(cfg, run_dir, args.resume, args.overwrite, args.config is not None, args.overrides)
        from dvtrain.trainer import train

        train(_context(cfg, run_dir))
        print(f"results: {run_dir / 'results.md'}", flush=True)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dvtrain: interrupted; the last epoch checkpoint is kept: continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvtrain eval", description="Evaluate the saved stages of a run again.")
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
        from dvtrain.trainer import evaluate_saved

        evaluate_saved(_context(cfg, run_dir), args.stage or cfg.stages)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "eval": eval_main}
    if not argv or argv[0] not in commands:
        print("usage: dvtrain {train,eval} ...  (dvtrain COMMAND --help for details)", file=sys.stderr)
        return EXIT_USER_ERROR
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

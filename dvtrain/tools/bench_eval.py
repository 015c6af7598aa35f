"""Evaluation throughput: images/s per white-box attack of `dvtrain eval`'s table, at 1 and 2 processes
(or the counts given) in one run, and the speed-up of each count over the smallest (issue 22 item 5).

    python -m dvtrain.tools.bench --eval [--procs 1 2] [--device cpu|cuda|auto] [--threads N] [--images N]
                                   [--train-epochs N | --run RUN_DIR --stage STAGE] [--config YAML]
                                   [--attacks NAME,NAME,...] [eval.key=value ...]

What runs is dvtrain's own evaluation path: every count P > 1 is a real launch, `python -m
torch.distributed.run --standalone --nproc_per_node P` (gloo on the CPU, NCCL on GPUs, through
`init_runtime` as `dvtrain eval` joins a launch), each process with `--threads` torch threads
(OMP_NUM_THREADS too), holding every submodel and calling `dvtrain.eval.whitebox.evaluate_stage` with
`share=ProcessGroupShare(...)`, one attack at a time; one process runs without a launcher and with
`share=None`, as plain `dvtrain eval` does.
The attacks and their budgets are the config's `eval.full_attacks` (default: the quickstart's
`dvtrain eval` table, configs/digits_quickstart.yaml, with its reduced budget: AutoAttack on the
mixture only, 25 iterations, 500 Square queries; the adaptive attack at 25 steps).

The ensemble: by default the config's submodels trained by `dvtrain train` for `--train-epochs` vanilla
epochs (0: freshly initialised weights) in a temporary run directory; `--run RUN_DIR --stage STAGE`
times a stage of an existing run instead. Robustness changes what AutoAttack and the adaptive attack
cost (they only keep attacking images still robust), so their figures are those of that ensemble.

Per attack: every process first runs it on a few images (warm-up: imports, thread pools, the process
group's first collectives), then, between two barriers, on the table's images; images/s = images
attacked (Σ over the attack's rows of n × seeds: every model it runs on, every norm) / wall seconds of
the slowest process. "overall" is all attacks' images over all their seconds. Each process also
records the CPU seconds it spent in the timed run: "split-bound P×" = the P processes' CPU seconds
together over the busiest one's, the speed-up the split of their work allows on otherwise idle cores
(uneven shares lower it; other jobs on the machine hardly do, since the P processes run side by side);
work every process repeats shows as a larger total than one process's. The last line printed is one
JSON object with every figure and the machine's load average (`uptime`) before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dvtrain.config import Config, load_config
from dvtrain.data import load_dataset
from dvtrain.distributed.runtime import init_runtime, launched_world_size, resolve_device, shutdown
from dvtrain.errors import DvtrainError
from dvtrain.exits import EXIT_USER_ERROR
from dvtrain.eval.load import finished_stages, load_stage
from dvtrain.eval.share import ProcessGroupShare
from dvtrain.eval.whitebox import chunk_count, evaluate_stage, too_many_processes
from dvtrain.submodels import build_submodel

PROG = "python -m dvtrain.tools.bench --eval"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_quickstart.yaml"
DEFAULT_PROCS = (1, 2)
DEFAULT_TRAIN_EPOCHS = 2  # a few vanilla epochs: most clean images right, so the attacks have work to do
TRAINED_STAGE = "vanilla"
WARMUP_IMAGES_PER_CHUNK = 4  # the warm-up: one chunk of this many images per process
LAUNCH_TIMEOUT_S = 24 * 3600  # a generous bound on one launch (the full protocol on a CPU takes hours)
OUTPUT_TAIL_LINES = 20  # of a failed launch's output, shown with the error


# ----------------------------------------------------------------------------- one launched process


def describe(device: torch.device) -> str:
    """The device a benchmark ran on, as its report names it (CPU model, cores, torch threads; or the GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _wait_for_all(device: torch.device) -> None:
    """Every process's queued work done: the device's, then a barrier over the process group (if any)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def images_attacked(rows: list[dict], attack: str) -> int:
    """Images an attack was run on, from its rows of `evaluate_stage`: n per (model, norm), times the
    seeds a randomised attack is repeated with (worst-case rows are not attacks)."""
    return sum(r["n"] * len(r.get("seed_accuracies", [None])) for r in rows if r["attack"] == attack)


def time_attacks(stage: str, submodels: list, x: torch.Tensor, y: torch.Tensor, cfg: Config, attacks: list[str],
                 share: ProcessGroupShare | None, device: torch.device) -> dict[str, dict]:
    """Per attack: {"models", "images", "seconds"} of `evaluate_stage` on the table's images (x [N, C, H, W]
    in [0, 1], y [N]), shared out by `share`, each attack timed on its own after a warm-up run of it."""
    world = 1 if share is None else share.world
    warm = dataclasses.replace(cfg.eval, num_examples=world * WARMUP_IMAGES_PER_CHUNK,
                               chunk_size=WARMUP_IMAGES_PER_CHUNK)
    for attack in attacks:
        evaluate_stage(stage, submodels, x, y, warm, cfg.seed, attacks=[attack], share=share)
    figures = {}
    for attack in attacks:
        _wait_for_all(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = evaluate_stage(stage, submodels, x, y, cfg.eval, cfg.seed, attacks=[attack], share=share)
        cpu = time.process_time() - cpu_start  # this process's own work, whatever else the machine runs
        _wait_for_all(device)
        seconds = time.perf_counter() - start
        figures[attack] = {"models": len({r["model"] for r in rows if r["attack"] == attack}),
                           "images": images_attacked(rows, attack), "seconds": seconds,
                           "cpu_s": [cpu] if share is None else share.gather(cpu)}
    return figures


def worker(spec_file: Path) -> None:
    """One process of a launch: the spec's ensemble on its device, every attack timed; rank 0 writes the
    figures to the spec's "out" file."""
    from dvtrain.compute import set_threads

    spec = json.loads(spec_file.read_text())
    cfg = load_config(spec["config"], spec["overrides"])
    set_threads(cfg.compute)
    _, device = init_runtime(cfg, whole_ensemble=True)  # as `dvtrain eval`: every rank holds every submodel
    try:
        share = ProcessGroupShare(cfg.eval.task_timeout_s) if launched_world_size() > 1 else None
        data = load_dataset(cfg.data).to(device)
        if spec["run_dir"] is None:  # freshly initialised: each submodel from its own seed, as training starts
            submodels = [build_submodel(cfg, data, i).to(device) for i in range(cfg.ensemble.size)]
        else:
            submodels = load_stage(Path(spec["run_dir"]), cfg, data, spec["stage"], device)
        figures = time_attacks(spec["stage"], submodels, data.x_test, data.y_test, cfg, spec["attacks"], share, device)
        if share is None or share.rank == 0:
            Path(spec["out"]).write_text(json.dumps(figures))
    finally:
        shutdown()


# ----------------------------------------------------------------------------- the driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=list(DEFAULT_PROCS), help="process counts (default: 1 2)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto; on GPUs one per process")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) per process (default 1)")
    p.add_argument("--images", type=int, default=None,
                   help="the table's images (eval.num_examples; 0: the whole test set; default: the config's)")
    p.add_argument("--config", type=Path, default=None,
                   help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])}, or the run's)")
    p.add_argument("--train-epochs", type=int, default=DEFAULT_TRAIN_EPOCHS,
                   help=f"vanilla epochs of the timed ensemble (0: freshly initialised; default {DEFAULT_TRAIN_EPOCHS})")
    p.add_argument("--run", type=Path, default=None, help="time a stage of this run directory instead of training")
    p.add_argument("--stage", default=None, help="with --run: the stage to time (default: its last finished one)")
    p.add_argument("--attacks", default=None, metavar="NAME,NAME,...",
                   help="attacks to time, comma-separated (default: the config's eval.full_attacks)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # one launched process
    p.add_argument("overrides", nargs="*", metavar="eval.key=value", help="eval.* overrides, e.g. eval.chunk_size=30")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[Config, Path, list[str], torch.device, int]:
    """The validated config, its file, the overrides for the workers, the device and the table's image
    count; raises DvtrainError (one line) on bad input."""
    if min(args.procs) < 1 or args.threads < 1 or args.train_epochs < 0 or (args.images or 0) < 0:
        raise DvtrainError("--procs, --threads, --train-epochs and --images take counts (≥ 1; ≥ 0 for the last two)")
    bad = [o for o in args.overrides if not o.startswith("eval.")]
    if bad:
        raise DvtrainError(f"only eval.* overrides are accepted, got {bad[0]}; use --device and --threads for the rest")
    if args.stage is not None and args.run is None:
        raise DvtrainError("--stage needs --run RUN_DIR; without it the bench trains its own vanilla ensemble")
    if args.run is not None and not (args.run / "config.yaml").is_file():
        raise DvtrainError(f"{args.run} is not a dvtrain run directory (no config.yaml); pass the directory train wrote")
    device = resolve_device(args.device)
    if device.type == "cuda" and max(args.procs) > torch.cuda.device_count():
        raise DvtrainError(f"--procs {max(args.procs)} on {torch.cuda.device_count()} GPU(s): one process per GPU; "
                           "lower --procs or use --device cpu")
    config = args.config or (args.run / "config.yaml" if args.run is not None else DEFAULT_CONFIG)
    overrides = [f"device={device}", f"compute.threads={args.threads}", *args.overrides]
    if args.images is not None:
        overrides.append(f"eval.num_examples={args.images}")
    if args.attacks is not None:
        overrides.append(f"eval.full_attacks=[{args.attacks}]")
    cfg = load_config(config, overrides)
    n_test = len(load_dataset(cfg.data).y_test)
    n_images = n_test if cfg.eval.num_examples == 0 else min(n_test, cfg.eval.num_examples)
    if max(args.procs) > chunk_count(n_images, cfg.eval):
        raise DvtrainError(too_many_processes(max(args.procs), n_images, cfg.eval))
    if args.run is not None:  # the stage to time: finished, or refused here with one line
        args.stage = finished_stages(args.run, cfg, None if args.stage is None else [args.stage])[-1]
    return cfg, config, overrides, device, n_images


def _run(cmd: list[str], env: dict, what: str) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-OUTPUT_TAIL_LINES:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


def train_ensemble(config: Path, run_dir: Path, epochs: int, device: torch.device, env: dict) -> None:
    """The config's ensemble after `epochs` vanilla epochs, saved by `dvtrain train` in `run_dir`."""
    _run([sys.executable, "-m", "dvtrain.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
          f"stages=[{TRAINED_STAGE}]", f"{TRAINED_STAGE}.epochs={epochs}", f"device={device}",
          "eval.attacks=[clean]", "logging.wandb=disabled", "logging.progress=false"], env, "training the ensemble")


def launch(procs: int, spec: dict, folder: Path, env: dict) -> dict[str, dict]:
    """One launch of `procs` processes timing every attack; their figures (rank 0's)."""
    spec = spec | {"out": str(folder / f"figures_{procs}.json")}
    spec_file = folder / f"spec_{procs}.json"
    spec_file.write_text(json.dumps(spec))
    # One process runs as plain `dvtrain eval` does (no launcher, no process group); more under torchrun.
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    _run([sys.executable, *launcher, "-m", "dvtrain.tools.bench_eval", "--worker", str(spec_file)], env,
         f"the launch of {procs} process(es)")
    return json.loads(Path(spec["out"]).read_text())


def summarise(per_procs: dict[int, dict[str, dict]]) -> dict:
    """Per attack and overall: images, seconds and images/s per process count, and the speed-up of
    each count over the smallest one."""
    counts = sorted(per_procs)
    base = counts[0]

    def entry(images: int, seconds: dict[int, float], cpu: dict[int, list[float]], models: int | None = None) -> dict:
        ips = {str(p): round(images / s, 2) for p, s in seconds.items()}
        out = {"images": images, "seconds": {str(p): round(s, 3) for p, s in seconds.items()}, "images_per_s": ips,
               "speedup": {str(p): round(ips[str(p)] / ips[str(base)], 2) for p in counts[1:]},
               "cpu_s": {str(p): [round(c, 3) for c in per_rank] for p, per_rank in cpu.items()},
               # The speed-up the split of P processes' work allows on idle cores: their CPU seconds together
               # over the busiest one's (P when shares are even). Both come from the same run, so the load
               # hardly changes it; CPU seconds of different runs are not comparable on a shared machine.
               "split_bound_speedup": {str(p): round(sum(cpu[p]) / max(cpu[p]), 2) for p in counts[1:]}}
        return out if models is None else {"models": models} | out

    first = per_procs[base]
    attacks = {a: entry(f["images"], {p: per_procs[p][a]["seconds"] for p in counts},
                        {p: per_procs[p][a]["cpu_s"] for p in counts}, f["models"])
               for a, f in first.items()}
    overall = entry(sum(f["images"] for f in first.values()),
                    {p: sum(f["seconds"] for f in per_procs[p].values()) for p in counts},
                    {p: [sum(per_rank) for per_rank in zip(*(f["cpu_s"] for f in per_procs[p].values()))]
                     for p in counts})
    return {"attacks": attacks, "overall": overall}


def print_table(summary: dict, counts: list[int]) -> None:
    base = counts[0]
    head = f"{'attack':<18}{'models':>7}{'images':>8}" + "".join(f"{f'{p} proc img/s':>15}" for p in counts)
    print(head + "".join(f"{f'{p} vs {base}':>9}" for p in counts[1:])
          + "".join(f"{f'split-bound {p}×':>17}" for p in counts[1:]))
    rows = [*summary["attacks"].items(), ("overall", summary["overall"])]
    for name, f in rows:
        line = f"{name:<18}{f.get('models', ''):>7}{f['images']:>8}"
        line += "".join(f"{f['images_per_s'][str(p)]:>15.1f}" for p in counts)
        line += "".join(f"{f['speedup'][str(p)]:>8.2f}×" for p in counts[1:])
        print(line + "".join(f"{f['split_bound_speedup'][str(p)]:>16.2f}×" for p in counts[1:]))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return None
    try:
        cfg, config, overrides, device, n_images = check_args(args)
    except DvtrainError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    counts = sorted(set(args.procs))
    torch.set_num_threads(args.threads)  # as in each launched process, so that `describe` says their count
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="dvtrain-bench-eval-") as tmp:
            folder = Path(tmp)
            if args.run is None and args.train_epochs == 0:
                run_dir, stage, weights = None, TRAINED_STAGE, "freshly initialised"
            elif args.run is None:
                run_dir, stage = folder / "run", TRAINED_STAGE
                train_ensemble(config, run_dir, args.train_epochs, device, env)
                weights = f"{TRAINED_STAGE} stage, {args.train_epochs} epoch(s)"
            else:
                run_dir = args.run
                stage = args.stage
                weights = f"{run_dir}, stage {stage}"
            spec = {"config": str(config), "overrides": overrides, "run_dir": run_dir and str(run_dir), "stage": stage,
                    "attacks": list(cfg.eval.full_attacks)}
            per_procs = {p: launch(p, spec, folder, env) for p in counts}
    except RuntimeError as exc:  # training or a launch failed: its output's tail, not this driver's traceback
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    summary = summarise(per_procs)
    print(f"evaluation throughput, {cfg.model.arch}×{cfg.ensemble.size} ({weights}), {n_images} images in "
          f"{chunk_count(n_images, cfg.eval)} chunks of at most {cfg.eval.chunk_size}, {args.threads} thread(s) per process, {describe(device)}")
    print_table(summary, counts)
    report = {
        "device": describe(device), "torch": torch.__version__,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "procs": counts, "threads_per_process": args.threads, "config": str(config), "weights": weights,
        "stage": stage, "images": n_images, "chunk_size": cfg.eval.chunk_size,
        "chunks": chunk_count(n_images, cfg.eval), **summary,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

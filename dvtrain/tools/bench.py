"""Throughput of a DVERGE step: a reference-style baseline against dvtrain's engines, in one process.

    python -m dvtrain.tools.bench [--device cpu|cuda|auto] [--steps N] [--quick] [--settings NAME ...]
                            [--precision fp32|bf16] [--channels-last] [--compile] [--cuda-graphs]
    python -m dvtrain.tools.bench --eval ...   (evaluation throughput at 1 and 2 processes: dvtrain.tools.bench_eval)

Columns: "reference" is written the way the authors' code works (one submodel at a time; every
distillation iteration recomputes the target features and runs a full `backward` that also fills
weight gradients, then one forward per other submodel's batch and an SGD step); "loop" and "grouped"
are `dvtrain.train.dverge.dverge_step` with `LocalPlacement` and that engine, with the `compute` options
given on the command line (the reference always runs fp32, eager, NCHW). Every setting is timed at
several layers and averaged, because the layer changes every epoch; the columns take turns step by
step. Peak memory is the largest growth during one of a column's timed steps:
`torch.cuda.max_memory_allocated` on a GPU, the resident-set high-water mark on the CPU.

Machine-independent figures per column: `ops_per_step` (aten operators one steady-state step
dispatches: on a GPU, kernel launches) and `host_syncs_per_step` (those that make the host wait for
the device), see `StepCounter`. `--search` times the best CPU configuration (engine × precision ×
threads) against the reference at its best; `--cuda-graphs` adds the captured step (GPUs only). The
last line printed is one JSON object with every figure, and the machine's load average (`uptime`)
before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dvtrain.attacks import project_linf
from dvtrain.compute import CapturedStep, autocast, check_compute
from dvtrain.errors import DvtrainError
from dvtrain.exits import EXIT_USER_ERROR
from dvtrain.config import ENGINES, PRECISIONS, ComputeConfig, Config, DvergeConfig, load_config
from dvtrain.data import Dataset
from dvtrain.train.dverge import dverge_step
from dvtrain.train.engines import make_engine
from dvtrain.submodels import build_submodel
from dvtrain.train.optim import build_owned
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.distributed.runtime import resolve_device
from dvtrain.tools.bench_eval import describe

ENSEMBLE_SIZE = 3
DISTILL_STEPS = 10
IMAGE_SHAPE = (3, 32, 32)  # CIFAR-shaped random data
NUM_CLASSES = 10
LAYERS_TIMED = 5  # evenly spaced, first and last included: all of Conv's 5, 5 of ResNet-20's 20
DEFAULT_TIMED_STEPS = 3
WARMUP_STEPS = 1
SEED = 0

# The projections: the report's Conv×3 run and the reference's ResNet-20×3 run, 200 DVERGE epochs each.
EPOCHS = 200
EPOCH_IMAGES = 50_000
PROJECTIONS = {"conv_x3_200ep": "conv_x3_b32", "resnet20_x3_200ep": "resnet20_x3_b128"}

QUICK_BATCH = 4
QUICK_DISTILL_STEPS = 2
QUICK_TIMED_STEPS = 1
QUICK_LAYERS_TIMED = 2

MIB = 2**20
SECONDS_PER_HOUR = 3600
COLUMNS = ("reference", *ENGINES)
CAPTURED = "captured"  # the grouped engine's step replayed from CUDA graphs (--cuda-graphs, GPUs only)
EVAL_FLAG = "--eval"  # hands the command line to dvtrain.tools.bench_eval (evaluation throughput)


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str
    batch: int


SETTINGS = (
    Setting("conv_x3_b32", "conv", 32),
    Setting("conv_x3_b128", "conv", 128),
    Setting("resnet20_x3_b128", "resnet20", 128),
)


# ----------------------------------------------------------------------------- the reference-style baseline


def reference_distill(model: nn.Module, layer: int, x: Tensor, x_s: Tensor, cfg: DvergeConfig) -> Tensor:
    """Distillation as the authors' loop does it: target features recomputed at every iteration and a
    full `backward` that also computes weight gradients, which are then thrown away."""
    z = x_s.clone()
    velocity = torch.zeros_like(z)
    for _ in range(cfg.steps):
        z.requires_grad_(True)
        target = model.features(x, layer).detach()
        loss = F.mse_loss(model.features(z, layer), target)
        model.zero_grad()
        loss.backward()
        l1 = z.grad.abs().flatten(1).sum(dim=1).view(-1, 1, 1, 1)
        velocity = cfg.momentum * velocity + z.grad / l1
        z = project_linf(z.detach() - cfg.step_size * velocity.sign(), x_s, cfg.eps)
    model.zero_grad()
    return z.detach()


def reference_step(
    models: list[nn.Module], optimizers: list[torch.optim.Optimizer], layer: int,
    x: Tensor, x_s: Tensor, y_s: Tensor, cfg: DvergeConfig,
) -> None:
    """All distilled batches from the pre-update models, then per submodel one forward per other
    submodel's batch, `backward` and an SGD step. Models stay in train mode, as in the reference."""
    distilled = [reference_distill(m, layer, x, x_s, cfg) for m in models]
    for i, (model, optimizer) in enumerate(zip(models, optimizers)):
        optimizer.zero_grad()
        loss = sum(F.cross_entropy(model(d), y_s) for j, d in enumerate(distilled) if j != i)
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------- measuring


class PeakMemory:
    """Growth of memory use over a block: allocator peak on CUDA, resident-set high-water mark on the CPU.

    On Linux the high-water mark is reset through /proc/self/clear_refs, so each block is measured on
    its own; elsewhere `getrusage` gives the process's peak so far, which later blocks cannot undercut.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0
        self.since_reset = False

    def __enter__(self) -> "PeakMemory":
        _release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.since_reset = _reset_rss_peak()
            self.start = _status_bytes("VmRSS") if self.since_reset else _peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_bytes("VmHWM") if self.since_reset else _peak_rss()
        return max(peak - self.start, 0) / MIB


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ≥ 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    """A memory figure of /proc/self/status (given there in KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _release_memory() -> None:
    """Free what earlier columns left, so a column's growth is its own (glibc keeps freed pages)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Batches:
    x: Tensor  # [steps, B, C, H, W]
    y: Tensor  # [steps, B]
    x_s: Tensor
    y_s: Tensor


def random_batches(steps: int, batch: int, device: torch.device) -> Batches:
    g = torch.Generator().manual_seed(SEED)
    x, x_s = (torch.rand((steps, batch, *IMAGE_SHAPE), generator=g).to(device) for _ in range(2))
    y, y_s = (torch.randint(0, NUM_CLASSES, (steps, batch), generator=g).to(device) for _ in range(2))
    return Batches(x, y, x_s, y_s)


def _config(setting: Setting, distill_steps: int, compute: ComputeConfig) -> Config:
    cfg = load_config(None, [
        f"model.arch={setting.arch}", f"ensemble.size={ENSEMBLE_SIZE}",
        f"dverge.batch_size={setting.batch}", f"dverge.steps={distill_steps}",
    ])
    return replace(cfg, compute=compute)


def _random_dataset(batch: int) -> Dataset:
    """Only the shapes and normalisation statistics matter for building the models."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand((batch, *IMAGE_SHAPE), generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return Dataset("random", x, y, x, y, num_classes=NUM_CLASSES)


StepFn = Callable[[int, int], None]  # (layer, batch index) → one DVERGE step


def make_step(column: str, cfg: Config, data: Batches, device: torch.device) -> StepFn:
    """A fresh ensemble (same initial weights for every column) and the step function of `column`."""
    if column == "reference":
        cfg = replace(cfg, compute=ComputeConfig())
    owned = build_owned(cfg, _random_dataset(data.x.shape[1]), list(range(ENSEMBLE_SIZE)), "dverge", device)
    d = cfg.dverge
    if column == "reference":
        models = [owned.models[i].train() for i in owned.ids]
        o = d.optim  # torch's own defaults (for-loop SGD on the CPU, foreach on GPUs), as the authors' code
        optimizers = [torch.optim.SGD(m.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
                      for m in models]
        return lambda layer, k: reference_step(models, optimizers, layer, data.x[k], data.x_s[k], data.y_s[k], d)
    engine = make_engine("grouped" if column == CAPTURED else column, cfg.compute)
    placement = LocalPlacement(ENSEMBLE_SIZE)
    captured = CapturedStep(engine.forget) if column == CAPTURED else None

    def step(layer: int, k: int) -> None:
        batch = (data.x[k], data.y[k], data.x_s[k], data.y_s[k])
        with autocast(cfg.compute, device):
            if captured is None:
                dverge_step(owned, placement, engine, layer, *batch, d)
            else:
                captured(layer, lambda *b: dverge_step(owned, placement, engine, layer, *b, d), *batch)

    return step


# ----------------------------------------------------------------------------- counting

# Operators whose output shape or value the host must read from the device before it can go on.
READS_DEVICE = {
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t): an `if` on a tensor's value
    "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "equal",
}
# Tensor methods that read the whole tensor on the host; on the CPU they dispatch nothing to count.
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
              "__repr__", "__str__", "__format__"}


class StepCounter(TorchDispatchMode):
    """The aten operators dispatched inside the block (`ops`; on a GPU each is a kernel launch, or a
    metadata-only view), and those that make the host wait for the device (`syncs`, by kind):

    - a read of a tensor on the host: `.item()`, `float(t)`, `bool(t)` (a data-dependent `if`),
      `.tolist()`, `.cpu()`, `.numpy()`, printing (seen as Tensor methods by a `TorchFunctionMode`,
      since on the CPU some of them dispatch nothing) and `_local_scalar_dense` reached from C++;
    - operators whose output shape depends on values (`nonzero`, `masked_select`, `unique`, ...);
    - copies between devices (`_to_copy`/`copy_` from one device to another);
    - on the CPU only: random draws from a CPU generator, because dvtrain's generators live on the
      CPU and on a GPU each such draw is followed by a host→device copy (counted there as a copy).

    So the figure means the same on any machine: what would wait for a GPU.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.ops = 0
        self.syncs: dict[str, int] = {}
        self.inside_read = 0
        self.reads = _HostReads(self)

    def __enter__(self) -> "StepCounter":
        self.reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.reads.__exit__(*exc)

    def note(self, kind: str) -> None:
        self.syncs[kind] = self.syncs.get(kind, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if self.inside_read:
            return out
        if name in READS_DEVICE:
            self.note(name)
        elif name in ("_to_copy", "copy_") and _devices(args, out) > 1:
            self.note("copy between devices")
        elif self.device.type == "cpu" and getattr(kwargs.get("generator"), "device", None) == torch.device("cpu"):
            self.note("random draw on a CPU generator")
        return out


class _HostReads(TorchFunctionMode):
    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in HOST_READS or self.counter.inside_read:
            return func(*args, **(kwargs or {}))
        self.counter.note(name)
        self.counter.inside_read += 1  # what it dispatches is part of this one read
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.inside_read -= 1


def _devices(args: tuple, out: object) -> int:
    """Distinct devices holding data among an operator's tensors ("meta" tensors hold none)."""
    return len({t.device for t in (*args, out) if isinstance(t, Tensor) and t.device.type != "meta"})


def count_step(step: StepFn, layer: int, k: int, device: torch.device) -> tuple[int, dict[str, int]]:
    """Operators and host synchronisations of one step (call it after a warm-up step: steady state)."""
    with StepCounter(device) as counter:
        step(layer, k)
    return counter.ops, counter.syncs


def count_columns(
    setting: Setting, layers: list[int], compute: ComputeConfig, device: torch.device, columns: tuple[str, ...] = COLUMNS
) -> dict:
    """Per column: operators and host synchronisations per steady-state step, averaged over `layers`.

    Counted at the reference's DISTILL_STEPS distillation steps even in a quick run: counts do not
    depend on the batch size, so a small batch makes this cheap."""
    cfg = _config(replace(setting, batch=QUICK_BATCH), DISTILL_STEPS, compute)
    data = random_batches(2, QUICK_BATCH, device)
    ops: dict[str, float] = {}
    syncs: dict[str, float] = {}
    kinds: dict[str, dict[str, int]] = {}
    for column in columns:
        step = make_step(column, cfg, data, device)
        counts = []
        for layer in layers:
            for _ in range(WARMUP_STEPS + (column == CAPTURED)):  # lazily built state, compiled or captured graphs
                step(layer, 0)
            counts.append(count_step(step, layer, 1, device))
        ops[column] = round(statistics.mean(c[0] for c in counts), 1)
        syncs[column] = round(statistics.mean(sum(c[1].values()) for c in counts), 1)
        found = {kind for _, per_kind in counts for kind in per_kind}
        kinds[column] = {kind: round(statistics.mean(c[1].get(kind, 0) for c in counts), 1) for kind in sorted(found)}
    return {"ops_per_step": ops, "host_syncs_per_step": syncs, "host_sync_kinds": kinds}


def timed_step(step: StepFn, layer: int, k: int, device: torch.device) -> tuple[float, float]:
    """Seconds of one step and the memory growth it caused, in MiB."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        step(layer, k)
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds, memory.mib()


def time_columns(
    steps: dict[str, StepFn], layers: list[int], count: int, device: torch.device, warm_every_layer: bool = False
) -> dict[str, tuple[float, float]]:
    """Per column: seconds per step (median of `count` steps per layer, mean over layers) and peak MiB.

    The columns take turns step by step, so a change of load on a shared machine hits them alike.
    """
    for column, step in steps.items():  # the deepest layer exercises every shape; compiling needs each layer
        for layer in layers if warm_every_layer else layers[-1:]:
            for k in range(WARMUP_STEPS + (column == CAPTURED)):  # a captured step: warm-up, then capture
                step(layer, k % count)
    seconds = {c: {layer: [] for layer in layers} for c in steps}
    peak = dict.fromkeys(steps, 0.0)
    for layer in layers:
        for k in range(count):
            for column, step in steps.items():
                t, mib = timed_step(step, layer, k, device)
                seconds[column][layer].append(t)
                peak[column] = max(peak[column], mib)
    return {
        c: (statistics.mean(statistics.median(ts) for ts in per_layer.values()), peak[c])
        for c, per_layer in seconds.items()
    }


def timed_layers(num_layers: int, count: int) -> list[int]:
    """`count` layers evenly spread over 1..num_layers (all of them when there are few)."""
    if num_layers <= count:
        return list(range(1, num_layers + 1))
    return sorted({round(v) for v in torch.linspace(1, num_layers, count).tolist()})


def run_setting(setting: Setting, args: argparse.Namespace, device: torch.device, counted: dict | None = None) -> dict:
    """Timings of every column at `setting`, and its counts (`counted` keeps them per architecture
    and layers, since they do not depend on the batch size)."""
    quick = args.quick
    batch = QUICK_BATCH if quick else setting.batch
    steps = QUICK_TIMED_STEPS if quick else args.steps
    cfg = _config(replace(setting, batch=batch), QUICK_DISTILL_STEPS if quick else DISTILL_STEPS, compute_options(args))
    num_layers = build_submodel(cfg, _random_dataset(batch), 0).num_layers
    layers = timed_layers(num_layers, QUICK_LAYERS_TIMED if quick else LAYERS_TIMED)
    data = random_batches(steps, batch, device)
    result = {"arch": setting.arch, "batch": batch, "layers": layers,
              "images_per_s": {}, "peak_mem_mib": {}, "speedup_vs_reference": {}}
    columns = (*COLUMNS, CAPTURED) if cfg.compute.cuda_graphs else COLUMNS
    steps_of = {c: make_step(c, cfg, data, device) for c in columns}
    timed = time_columns(steps_of, layers, steps, device, warm_every_layer=cfg.compute.compile or cfg.compute.cuda_graphs)
    for column, (seconds, mib) in timed.items():
        result["images_per_s"][column] = round(batch / seconds, 2)
        result["peak_mem_mib"][column] = round(mib, 1)
    reference = result["images_per_s"]["reference"]
    for column in columns[1:]:
        result["speedup_vs_reference"][column] = round(result["images_per_s"][column] / reference, 2)
    counted = {} if counted is None else counted
    key = (setting.arch, tuple(layers))
    if key not in counted:
        counted[key] = count_columns(setting, layers, compute_options(args), device, columns)
    result.update(counted[key])
    return result


# The search of the best CPU configuration (--search): the reference at each thread count against
# dvtrain at each combination of engine, precision and thread count, all taking turns in one run.
SEARCH_THREADS = (1, 2)


def with_threads(step: StepFn, threads: int) -> StepFn:
    def run(layer: int, k: int) -> None:
        torch.set_num_threads(threads)
        step(layer, k)
    return run


def run_search(setting: Setting, args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of every candidate configuration of `setting`, and the best of each side.

    Names: "reference@T" and "ENGINE/PRECISION@T" (T torch threads). Processes are not searched here
    (one process per measurement); see docs/performance.md for launches of several CPU processes.
    """
    quick = args.quick
    batch = QUICK_BATCH if quick else setting.batch
    count = QUICK_TIMED_STEPS if quick else args.steps
    distill_steps = QUICK_DISTILL_STEPS if quick else DISTILL_STEPS
    data = random_batches(count, batch, device)
    steps: dict[str, StepFn] = {}
    for threads in SEARCH_THREADS:
        cfg = _config(replace(setting, batch=batch), distill_steps, ComputeConfig())
        steps[f"reference@{threads}"] = with_threads(make_step("reference", cfg, data, device), threads)
        for engine in ENGINES:
            for precision in PRECISIONS:
                cfg = _config(replace(setting, batch=batch), distill_steps, ComputeConfig(precision=precision))
                steps[f"{engine}/{precision}@{threads}"] = with_threads(make_step(engine, cfg, data, device), threads)
    num_layers = build_submodel(cfg, _random_dataset(batch), 0).num_layers
    layers = timed_layers(num_layers, QUICK_LAYERS_TIMED if quick else LAYERS_TIMED)
    threads_before = torch.get_num_threads()
    try:
        timed = time_columns(steps, layers, count, device)
    finally:
        torch.set_num_threads(threads_before)
    ips = {name: round(batch / seconds, 2) for name, (seconds, _) in timed.items()}
    reference = max((n for n in ips if n.startswith("reference")), key=ips.get)
    best = max((n for n in ips if not n.startswith("reference")), key=ips.get)
    return {"setting": setting.name, "batch": batch, "layers": layers, "images_per_s": ips,
            "best_reference": reference, "best_dvtrain": best, "ratio": round(ips[best] / ips[reference], 2)}


def projected_hours(settings: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Wall time of EPOCHS epochs of EPOCH_IMAGES images at the measured throughputs."""
    return {
        run: {column: round(EPOCHS * EPOCH_IMAGES / ips / SECONDS_PER_HOUR, 1)
              for column, ips in settings[setting]["images_per_s"].items()}
        for run, setting in PROJECTIONS.items()
        if setting in settings
    }


def print_table(settings: dict[str, dict], hours: dict[str, dict[str, float]]) -> None:
    print(f"{'setting':<20}{'column':<11}{'images/s':>10}{'× ref':>8}{'peak MiB':>10}{'ops/step':>10}{'syncs/step':>11}")
    for name, r in settings.items():
        for column in r["images_per_s"]:
            ips, mib = r["images_per_s"][column], r["peak_mem_mib"][column]
            ratio = r["speedup_vs_reference"].get(column, 1.0)
            ops, syncs = r["ops_per_step"][column], r["host_syncs_per_step"][column]
            print(f"{name:<20}{column:<11}{ips:>10.1f}{ratio:>8.2f}{mib:>10.1f}{ops:>10.0f}{syncs:>11.1f}")
    for run, per_column in hours.items():
        print(f"projected {run}: " + ", ".join(f"{c} {h} h" for c, h in per_column.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dvtrain.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--steps", type=int, default=DEFAULT_TIMED_STEPS, help="timed steps per setting and layer")
    p.add_argument("--quick", action="store_true", help="tiny batches and steps: checks the bench runs, not speed")
    p.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS], default=[s.name for s in SETTINGS])
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="dvtrain's columns: compute.precision")
    p.add_argument("--channels-last", action="store_true", help="dvtrain's columns: compute.channels_last")
    p.add_argument("--compile", action="store_true", help="dvtrain's columns: compute.compile (warm-up compiles)")
    p.add_argument("--search", action="store_true",
                   help="also search the best CPU configuration of the first setting (engine × precision × threads)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help=f"add a '{CAPTURED}' column: the grouped step replayed from CUDA graphs (GPUs only)")
    p.add_argument(EVAL_FLAG, action="store_true",
                   help="evaluation throughput per attack at 1 and 2 processes instead (`--eval --help` lists its options)")
    return p.parse_args(argv)


def compute_options(args: argparse.Namespace) -> ComputeConfig:
    return ComputeConfig(precision=args.precision, channels_last=args.channels_last, compile=args.compile,
                         cuda_graphs=args.cuda_graphs)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if EVAL_FLAG in argv:
        from dvtrain.tools.bench_eval import main as eval_main

        return eval_main([a for a in argv if a != EVAL_FLAG])
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_compute(replace(Config(), compute=compute_options(args)), device, world_size=1)
    except DvtrainError as exc:
        print(f"python -m dvtrain.tools.bench: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    load_before = os.getloadavg()
    counted: dict = {}
    settings = {s.name: run_setting(s, args, device, counted) for s in SETTINGS if s.name in args.settings}
    hours = projected_hours(settings)
    print_table(settings, hours)
    search = None
    if args.search:
        search = run_search(next(s for s in SETTINGS if s.name in args.settings), args, device)
        for name, ips in sorted(search["images_per_s"].items(), key=lambda item: -item[1]):
            print(f"search {search['setting']:<14}{name:<20}{ips:>10.1f}")
        print(f"best dvtrain configuration: {search['best_dvtrain']}, {search['ratio']}× the reference at its best "
              f"({search['best_reference']})")
    first = next(iter(settings.values()))
    report = {
        "device": describe(device), "torch": torch.__version__, "quick": args.quick,
        # The machine's load (1, 5, 15 min averages, as `uptime` prints) before and after: timings on a
        # shared machine mean little without it.
        "load_average": {"before": load_before, "after": os.getloadavg()},
        # Machine-independent figures of the first setting, keyed by column (every setting has its own).
        "ops_per_step": first["ops_per_step"], "host_syncs_per_step": first["host_syncs_per_step"],
        "counted_on": next(iter(settings)),
        "compute": dataclasses.asdict(compute_options(args)), "ensemble_size": ENSEMBLE_SIZE, "distill_steps": QUICK_DISTILL_STEPS if args.quick else DISTILL_STEPS,
        "timed_steps": QUICK_TIMED_STEPS if args.quick else args.steps,
        "settings": settings, "projected_hours": hours, "search": search,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

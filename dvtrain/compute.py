"""How the hot loop runs on the device: CPU threads, bf16 autocast, channels-last memory, torch.compile.

These are speed options, not part of the algorithm: each changes results only as far as its
precision does. All are off by default, which is what a CPU wants; on a GPU the report's small nets
are bound by kernel launches, which `compile` (fusion) and the grouped engine (fewer, wider kernels)
attack, while bf16 and channels-last speed up the arithmetic of the larger ResNet.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn

from dvtrain.config import ComputeConfig

# Compiled graphs a model's `features` may need per layer: grad or no grad (distillation target),
# train or eval mode, and the batch shapes before dynamo marks the batch dimension dynamic.
GRAPHS_PER_LAYER = 8
# What torch would use on its own (one thread per core, or OMP_NUM_THREADS): `auto` never exceeds it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()
# Load (runnable processes) above the cores our threads leave free that still counts as an idle machine.
BUSY_MARGIN = 0.5


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which cgroups and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run on this node, as `torchrun` and `accelerate launch` announce them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_threads(setting: int | str, processes: int, cores: int) -> int:
    """Torch threads per process for `compute.threads`: a number as given; `auto` shares the cores among
    the node's processes (at least 1, at most what torch would use). One thread per core, torch's own
    default, oversubscribes a machine whose cores other work also uses: on a busy 2-core machine the
    quickstart took 774-1500 s with 2 threads and 77-118 s with one (README, "Threads")."""
    if setting != "auto":
        return int(setting)
    return max(1, min(cores // max(processes, 1), TORCH_DEFAULT_THREADS))


def set_threads(cfg: ComputeConfig) -> int:
    """Set this process's torch threads per `compute.threads`; returns the count.

    Warns when the node's processes together ask for more threads than it has cores, or than the
    cores other work leaves idle (1-minute load average): OpenMP threads that wait on a busy core spin,
    and a step then takes many times longer (measured: 10x for the digits Conv on a loaded 2-core
    machine). The count itself never depends on the load, so a seed gives the same weights."""
    processes, cores = local_processes(), available_cores()
    threads = resolve_threads(cfg.threads, processes, cores)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads * processes > cores:
        warnings.warn(
            f"compute.threads={threads} × {processes} process(es) on this node exceeds its {cores} cores; "
            "the threads will wait on each other (compute.threads=auto shares the cores)",
            RuntimeWarning,
            stacklevel=2,
        )
    elif threads > 1 and threads * processes > cores - load + BUSY_MARGIN:
        warnings.warn(
            f"{threads} torch threads per process, but the machine is busy (load {load:.1f} on {cores} cores): "
            "threads that wait on busy cores can make training many times slower; compute.threads=1 avoids it",
            RuntimeWarning,
            stacklevel=2,
        )
    torch.set_num_threads(threads)
    return threads


def autocast(cfg: ComputeConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Training forwards (and so their backwards) in bf16 where the config asks; weights stay fp32.

    The context spans whole epochs, so its cache of bf16 weight copies is off: with it, every step
    would compute with the copies made at the first one, and nothing would learn.
    """
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class EagerFallback:
    """A compiled function that falls back to the eager one, with one warning, if compiling fails
    (no C++ compiler, an operation dynamo cannot trace, ...). A genuine error in the model then
    surfaces from the eager call, unchanged."""

    def __init__(self, eager: Callable, what: str) -> None:
        self.eager = eager
        self.compiled = torch.compile(eager)
        self.what = what
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly
                self.failed = True
                warnings.warn(
                    f"torch.compile failed for {self.what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "running it eagerly (set compute.compile=false to silence this)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.eager(*args, **kwargs)


def compile_features(model: nn.Module, models_sharing_code: int = 1) -> None:
    """Compile `model.features` (and so `forward`, which calls it) in place: one graph per layer."""
    limit = models_sharing_code * model.num_layers * GRAPHS_PER_LAYER
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    model.features = EagerFallback(model.features, f"{type(model).__name__}.features")


def uncompiled(model: nn.Module) -> None:
    """Undo `compile_features` on a copy: the copy must not call the original's compiled function."""
    vars(model).pop("features", None)


def prepare_model(model: nn.Module, cfg: ComputeConfig, models_sharing_code: int = 1) -> nn.Module:
    """Apply the memory-format and compile options to a freshly built model, in place."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_features(model, models_sharing_code)
    return model

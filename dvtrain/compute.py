"""How the hot loop runs on the device: CPU threads, bf16 autocast, channels-last memory, torch.compile,
CUDA graphs.

These are speed options, not part of the algorithm: each changes results only as far as its
precision does. All are off by default, which is what a CPU wants; on a GPU the report's small nets
are bound by kernel launches, which `compile` (fusion) and the grouped engine (fewer, wider kernels)
attack, while bf16 and channels-last speed up the arithmetic of the larger ResNet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch._dynamo
from torch import Tensor, nn

from dvtrain.config import ComputeConfig, Config
from dvtrain.errors import DvtrainError

# Compiled graphs a model's `features` may need per layer: grad or no grad (distillation target),
# train or eval mode, and the batch shapes before dynamo marks the batch dimension dynamic.
GRAPHS_PER_LAYER = 8
# What torch would use on its own (one thread per core, or OMP_NUM_THREADS): `auto` never exceeds it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()
# Load (runnable processes) above the cores our threads leave free that still counts as an idle machine.
BUSY_MARGIN = 0.5
# torch.backends.cpu.get_cpu_capability() values without AVX-512: bf16 arithmetic is emulated there.
NO_BF16_UNITS = ("NO AVX", "DEFAULT", "AVX2")  # x86


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which cgroups and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run on this node, as `torchrun` and `accelerate launch` announce them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def first_local_process() -> bool:
    """Local rank 0 of a launch (torchrun and accelerate set LOCAL_RANK), or the only process."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


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
    says = first_local_process()  # the warnings are about the node: its first process says them, once
    if says and threads * processes > cores:
        warnings.warn(
            f"compute.threads={threads} × {processes} process(es) on this node exceeds its {cores} cores; "
            "the threads will wait on each other (compute.threads=auto shares the cores)",
            RuntimeWarning,
            stacklevel=2,
        )
    elif says and threads > 1 and threads * processes > cores - load + BUSY_MARGIN:
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


# ----------------------------------------------------------------------------- CUDA graphs


def check_compute(cfg: Config, device: torch.device, world_size: int) -> None:
    """Refuse, before any work, compute options this run cannot honour; warn about bf16 on a CPU without
    AVX-512 (torch then converts every bf16 value in software).

    Raises:
        DvtrainError: `compute.cuda_graphs` on a device other than CUDA, in a multi-process launch
        (the collectives of the step are not captured), or with `logging.step_timing` (which
        synchronises inside the step).
    """
    if cfg.compute.precision == "bf16" and device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in NO_BF16_UNITS:
        warnings.warn(
            f"compute.precision=bf16 on a CPU whose widest vector unit is {torch.backends.cpu.get_cpu_capability()}: bf16 is "
            "emulated there and slower than fp32 (measured: 2.4x slower vanilla training, Fashion-MNIST Conv x3, AVX2); "
            "set compute.precision=fp32",
            RuntimeWarning,
            stacklevel=2,
        )
    if not cfg.compute.cuda_graphs:
        return
    if device.type != "cuda":
        raise DvtrainError(
            f"compute.cuda_graphs=true needs a CUDA device but this run is on {device.type}; set compute.cuda_graphs=false"
        )
    if world_size > 1:
        raise DvtrainError(
            f"compute.cuda_graphs=true captures single-process steps but {world_size} processes were launched; "
            "launch one process or set compute.cuda_graphs=false"
        )
    if cfg.logging.step_timing:
        raise DvtrainError("compute.cuda_graphs=true cannot time the phases of a replayed step; set logging.step_timing=false")


def _clone_tensors(value: Any) -> Any:
    """A copy of `value` whose tensors are clones (dataclasses, dicts, lists and tuples are walked)."""
    if isinstance(value, Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _clone_tensors(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


class CapturedStep:
    """A training step replayed from CUDA graphs: one graph per key (the caller's: layer, batch
    shapes, learning rates — whatever the step's kernels bake in).

    The step must run on the GPU without host synchronisation or host-side random draws,
    read its parameters, gradients and optimizer state from persistent tensors (updated in place)
    and return tensors. The first call for a key runs eagerly on a side stream (warm-up: cuDNN
    chooses its kernels, the optimizer creates its state), the second captures the step with
    static copies of its tensor inputs and replays it, later calls copy their inputs into those
    copies and replay. Outputs are cloned out of the graph's memory, which the next replay reuses.
    `before_eager` runs before every call that executes Python (warm-up and capture): a cache of
    device tensors keyed on version counters, which replays do not move, must be dropped there.

    All graphs share one memory pool, so a ResNet-20's 20 layers do not hold 20 sets of activations.
    That is safe because each replay is self-contained: what outlives it (weights, optimizer state,
    running statistics, the static inputs) was allocated outside the pool, and its outputs are
    cloned at once; gradients live in the pool and are rewritten by every replay before use.

    Follows the recipe of torch.cuda.graphs ("whole network capture", PyTorch CUDA semantics notes).
    """

    def __init__(self, before_eager: Callable[[], None] | None = None) -> None:
        self.before_eager = before_eager or (lambda: None)
        self.warm: set[Hashable] = set()
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Any]] = {}
        self.pool = None

    def __call__(self, key: Hashable, step: Callable[..., Any], *tensors: Tensor) -> Any:
        """`step(*tensors)`, or the replay of its graph captured under `key` (and the tensors' shapes)."""
        key = (key, *((t.shape, t.dtype) for t in tensors))
        if key in self.graphs:
            graph, static, out = self.graphs[key]
            for s, t in zip(static, tensors):
                s.copy_(t)
            graph.replay()
            return _clone_tensors(out)
        self.before_eager()
        if key not in self.warm:
            self.warm.add(key)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = step(*tensors)
            torch.cuda.current_stream().wait_stream(side)
            return out
        static = tuple(t.clone() for t in tensors)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step(*static)
        self.graphs[key] = (graph, static, out)
        graph.replay()
        return _clone_tensors(out)

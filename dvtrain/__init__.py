"""dvtrain: a distributed trainer for robust model ensembles with DVERGE (Yang et al., NeurIPS 2020).

Packages: `dvtrain.train` (the stage loop, the stages, engines), `dvtrain.eval`
(attacks and the robustness evaluation; imports no training code), `dvtrain.distributed` (process
group and placement of submodels on ranks), `dvtrain.models`; and the shared core: config, data,
submodels, checkpoint, tracking, attacks, feature distillation (`distill`).

Public API: `load_submodels(run_dir, stage, device=None)` and `load_mixture(run_dir, stage, device=None)`
load a trained run's models for any attack library (images in [0, 1]; the mixture returns log mean
probabilities, usable as logits). Like the CLI, they set torch's CPU threads to the run's
`compute.threads` (default 1) unless OMP_NUM_THREADS is set; `torch.set_num_threads` after loading
overrides it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dvtrain")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def load_submodels(run_dir, stage: str, device=None):
    """The submodels of a finished stage, in eval mode (see `dvtrain.eval.load.load_submodels`)."""
    from dvtrain.eval.load import load_submodels as load

    return load(run_dir, stage, device)


def load_mixture(run_dir, stage: str, device=None):
    """The mixture of a finished stage as one nn.Module (see `dvtrain.eval.load.load_mixture`)."""
    from dvtrain.eval.load import load_mixture as load

    return load(run_dir, stage, device)

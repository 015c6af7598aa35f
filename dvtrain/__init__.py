"""dvtrain: a distributed trainer for robust model ensembles with DVERGE (Yang et al., NeurIPS 2020).

Packages: `dvtrain.train` (the stage loop, the stages, engines, distillation), `dvtrain.eval`
(attacks and the robustness evaluation; imports no training code), `dvtrain.distributed` (process
group and placement of submodels on ranks), `dvtrain.models`; and the shared core: config, data,
submodels, checkpoint, tracking.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dvtrain")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

"""The one line `dvtrain eval` prints when its budget is below the paper's and RobustBench's
(issue 22 item 3): which settings of eval.* differ from the full protocol's defaults (`EvalConfig()`:
RobustBench's standard AutoAttack, MORA's adaptive schedule, the DVERGE paper's black-box protocol and
diversity matrix)."""

from __future__ import annotations

from dvtrain.config import EvalConfig

# (label, path under eval.): the settings that make an attack weaker or a figure noisier when lowered.
BUDGET_FIELDS = (
    ("AutoAttack version", "autoattack.version"), ("AutoAttack norms", "autoattack.norms"),
    ("AutoAttack iterations", "autoattack.iterations"), ("Square queries", "autoattack.square_queries"),
    ("mixture-only attacks", "mixture_only"), ("adaptive steps", "adaptive.steps"),
    ("adaptive blends", "adaptive.blend_scales"), ("adaptive target classes", "adaptive.target_classes"),
    ("surrogate ensembles", "transfer.surrogate_sizes"), ("surrogate epochs", "transfer.surrogate_epochs"),
    ("black-box steps", "transfer.blackbox_steps"), ("black-box restarts", "transfer.blackbox_restarts"),
    ("transfer images", "transfer.num_images"), ("transfer restarts", "transfer.restarts"),
    ("diversity pairs", "diversity.num_images"),
)


# What a null full-budget setting means (EvalConfig's null defaults), so the note names the real budget.
NULL_MEANS = {
    "autoattack.iterations": "the library's 100", "autoattack.square_queries": "the library's 5000",
    "transfer.surrogate_epochs": "the run's vanilla.epochs",
}


def _get(cfg: EvalConfig, path: str) -> object:
    value: object = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _full(full: EvalConfig, path: str) -> object:
    value = _get(full, path)
    return NULL_MEANS.get(path, value) if value is None else value


def reduced_budget_note(cfg: EvalConfig) -> str | None:
    """One line naming each budget setting of `cfg` that differs from the full protocol's, or None when
    none does (the CIFAR configs)."""
    full = EvalConfig()
    changed = [f"{label} {_get(cfg, path)} (full: {_full(full, path)})" for label, path in BUDGET_FIELDS
               if _get(cfg, path) != _get(full, path)]
    if not changed:
        return None
    return ("[eval] reduced budget, below the paper's and RobustBench's (a quick check, not a published "
            "figure): " + "; ".join(changed))

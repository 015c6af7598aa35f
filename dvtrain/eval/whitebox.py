"""The robustness table: every submodel and the mixture under every configured white-box attack,
with the worst case per image as the headline and a 95 % Wilson interval on every accuracy.

The ensemble is scored as the `Mixture` of its submodels and attacked end to end, so the adversary
sees the same averaged prediction that is being scored; the adaptive attack (`dvtrain.eval.attacks.adaptive`)
attacks the mixture through its submodels. Each (model, attack, seed) cell draws its random numbers
from its own generator derived from the run seed, so a cell does not depend on which other cells
were computed, and re-running an evaluation reproduces it exactly.

Rows (what results.json stores): {stage, model, attack, code (the attack's code version, name@version; a worst
case: those of its attacks), norm, eps, budget, accuracy (%), n, ci_low, ci_high,
images (`dvtrain.digest.images_digest` of the row's n images and labels), test_split (that of the whole
test set x, y they were taken from)} (+ sd and seed_accuracies when eval.seeds > 1). `attack: "worst_case"` rows give, per model and
threat model (norm, ε), the share of images that survive every attack of that norm that was run,
under every seed, and are classified correctly when clean.

Every row counts exactly the images it was computed on: the table's first N images (eval.num_examples),
except AutoAttack with eval.autoattack.num_examples = k, whose rows have n = k; a worst case covers
the first images every attack of its norm saw, and its n says how many. An image wrong when clean is
robust under no attack, so no row exceeds its model's clean accuracy on the same images.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dvtrain.config import EvalConfig
from dvtrain.digest import images_digest
from dvtrain.distributed.placement import LocalPlacement, Placement
from dvtrain.errors import DvtrainError
from dvtrain.eval.attacks.registry import L2, LINF, attack
from dvtrain.eval.progress import Phases
from dvtrain.eval.share import Share, Tasks
from dvtrain.eval.stats import PERCENT, accuracy_fields, wilson_interval
from dvtrain.mixture import Mixture
from dvtrain.rng import derive_seed, stream

WORST_CASE = "worst_case"
MIXTURE = "mixture"


class NonFiniteOutput(DvtrainError):
    pass


@dataclass(frozen=True)
class Cell:
    """One column of the table: an attack at a threat model (norm None for clean images)."""

    attack: str
    norm: str | None
    eps: float


def cells(attacks: list[str], cfg: EvalConfig) -> list[Cell]:
    """The table's columns for `attacks` (autoattack once per eval.autoattack.norms), in the given order."""
    eps = {LINF: cfg.eps, L2: cfg.l2_eps, None: 0.0}
    return [Cell(name, norm, eps[norm]) for name in attacks for norm in attack(name).norms(cfg)]


def randomised(cell: Cell, cfg: EvalConfig) -> bool:
    """Whether the attack draws random numbers (and is therefore repeated over eval.seeds)."""
    return attack(cell.attack).is_randomised(cfg)


def check_finite(model: nn.Module, x: Tensor, name: str) -> None:
    """Raise NonFiniteOutput (naming `name`) if the model returns NaN or ±inf on x [N, C, H, W]."""
    with torch.no_grad():
        out = model(x)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteOutput(
            f"{name} returns non-finite outputs (NaN or ±inf) on clean test images: its robustness cannot be measured; "
            "check the checkpoint (retrain or resume the stage from an earlier one)"
        )


def cell_size(cell: Cell, cfg: EvalConfig, n_images: int) -> int:
    """How many of the table's `n_images` images (its first ones) `cell` is computed on: all of them,
    except AutoAttack with eval.autoattack.num_examples = N > 0, which runs on the first N."""
    cap = attack(cell.attack).max_images
    return min(n_images, cap(cfg)) if cap is not None and cap(cfg) > 0 else n_images


def robust_mask(
    model: nn.Module, x: Tensor, y: Tensor, cell: Cell, cfg: EvalConfig, generator: torch.Generator,
    submodels: list[nn.Module] | None = None, placement: Placement | None = None, aa_seed: int = 0,
) -> Tensor:
    """Per image [N] (bool) of x [N, C, H, W] in [0, 1]: classified correctly both clean and on the
    attacked copy, in batches of eval.batch_size (the caller picks the images: `cell_size`, chunks).

    An image the model gets wrong when clean never counts as robust (AutoAttack's and RobustBench's
    definition of robust accuracy), so no attack's accuracy exceeds clean accuracy on the same images.
    PGD runs eval.restarts times, each from the generator's next random starts; an image counts as
    robust only if it withstands every run, as the reference evaluation counts restarts. "adaptive"
    needs the mixture's `submodels` and `placement`; "autoattack" runs the library in this process.
    """
    with torch.no_grad():
        correct = torch.cat([model(x[s : s + cfg.batch_size]).argmax(dim=1) for s in range(0, len(y), cfg.batch_size)]) == y
    spec = attack(cell.attack)
    if spec.robust is not None:
        return correct & spec.robust(model, x, y, cell.norm, cell.eps, cfg, aa_seed)
    if spec.perturb is None:
        return correct
    for _ in range(cfg.restarts if spec.restarts else 1):
        for start in range(0, len(y), cfg.batch_size):
            xb, yb = x[start : start + cfg.batch_size], y[start : start + cfg.batch_size]
            x_adv = spec.perturb(model, xb, yb, cell.eps, cfg, generator, submodels, placement)
            with torch.no_grad():
                correct[start : start + cfg.batch_size] &= model(x_adv).argmax(dim=1) == yb
    return correct


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, attack: str, eval_cfg: EvalConfig, batch_size: int, generator: torch.Generator
) -> float:
    """Accuracy in percent under one single-norm attack (clean, fgsm or a PGD variant) in batches of `batch_size`."""
    cfg = dataclasses.replace(eval_cfg, batch_size=batch_size)
    (cell,) = cells([attack], cfg)
    return PERCENT * float(robust_mask(model, x, y, cell, cfg, generator).double().mean())


def chunk_bounds(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of the first `size` images: ceil(size / chunk_size) chunks of at most
    `chunk_size` images whose sizes differ by at most one (the first ones the larger).

    Why not blocks of `chunk_size` and a short last one: the ranks take the chunks in turn, so a short
    tail leaves one rank with a whole chunk less work; 359 test images in blocks of 100 split 200/159
    over 2 processes (at most 1.8× one process), in chunks of 90/89 they split 180/179. The bounds
    depend on (size, chunk_size) alone, never on the number of processes."""
    count = -(-size // chunk_size)  # ceiling division
    if count == 0:
        return []
    base, extra = divmod(size, count)
    ends = [base * (c + 1) + min(c + 1, extra) for c in range(count)]
    return list(zip([0, *ends[:-1]], ends))


def chunk_count(n_images: int, cfg: EvalConfig) -> int:
    """How many chunks the table's `n_images` images make (the most processes `dvtrain eval` can use)."""
    return len(chunk_bounds(n_images, cfg.chunk_size))


def chunk_generator(seed: int, name: str, cell: Cell, chunk: int, s: int) -> torch.Generator:
    """The random starts of one (model, attack, norm, ε, chunk, seed): a stream of its own, so a chunk's
    images are attacked alike whichever process computes it and whatever else that process computes."""
    return stream(seed, "eval", name, cell.attack, cell.norm, float(cell.eps), "chunk", chunk, "seed", s)


def _chunk_masks(
    name: str, model: nn.Module, x: Tensor, y: Tensor, columns: list[Cell], cfg: EvalConfig, seed: int,
    submodels: list[nn.Module] | None = None, placement: Placement | None = None,
    phases: Phases | None = None, stage: str = "",
) -> dict[tuple[int, int, int], Tensor]:
    """(column index, seed, chunk) → the chunk's robustness mask (CPU), every chunk of each column's images
    (the training-time table, whose processes each score their own submodels); each column one phase of
    `phases` (a progress bar)."""
    phases = phases if phases is not None else Phases(False)
    out = {}
    for k, cell in enumerate(columns):
        bounds = chunk_bounds(cell_size(cell, cfg, len(y)), cfg.chunk_size)
        repeats = cfg.seeds if randomised(cell, cfg) else 1
        mine = range(len(bounds))
        threat = "" if cell.norm is None else f" {cell.norm} ε={cell.eps:g}"
        with phases.phase(f"{stage} {name} {cell.attack}{threat}".strip(),
                          repeats * sum(bounds[c][1] - bounds[c][0] for c in mine)) as bar:
            for s in range(repeats):
                for c in mine:
                    start, end = bounds[c]
                    aa_seed = derive_seed(seed, "autoattack", name, cell.norm, float(cell.eps), "chunk", c, "seed", s)
                    out[(k, s, c)] = robust_mask(model, x[start:end], y[start:end], cell, cfg,
                                                 chunk_generator(seed, name, cell, c, s), submodels, placement,
                                                 aa_seed).cpu()
                    bar.update(end - start)
    return out


def _assemble(parts: dict[tuple[int, int, int], Tensor], columns: list[Cell], cfg: EvalConfig,
              n_images: int) -> dict[Cell, list[Tensor]]:
    """Per cell, one mask [cell_size] per seed, its chunks' masks in image order."""
    out = {}
    for k, cell in enumerate(columns):
        count = chunk_count(cell_size(cell, cfg, n_images), cfg)
        out[cell] = [torch.cat([parts[(k, s, c)] for c in range(count)])
                     for s in range(cfg.seeds if randomised(cell, cfg) else 1)]
    return out


def _model_masks(
    name: str, model: nn.Module, x: Tensor, y: Tensor, columns: list[Cell], cfg: EvalConfig, seed: int,
    submodels: list[nn.Module] | None = None, placement: Placement | None = None, phases: Phases | None = None,
    stage: str = "",
) -> dict[Cell, list[Tensor]]:
    """Per cell, one robustness mask per seed (one for deterministic attacks), every chunk computed here."""
    parts = _chunk_masks(name, model, x, y, columns, cfg, seed, submodels, placement,
                         phases, stage)
    return _assemble(parts, columns, cfg, len(y))


def cell_budget(cell: Cell, cfg: EvalConfig, n_images: int) -> str:
    """What, besides the threat model (norm, ε), determines a cell's number, as a short canonical
    string: its images (n, the table's first ones), steps, step size, restarts, random start, seeds,
    AutoAttack's version and caps. Two rows with equal (stage, model, attack, norm, ε, budget) are the
    same measurement; results.json keeps one row per such key."""
    n = f"n={cell_size(cell, cfg, n_images)}"
    seeds = f"seeds={cfg.seeds if randomised(cell, cfg) else 1}"
    budget = attack(cell.attack).budget
    return n if budget is None else f"{budget(cfg, cell.norm)},{seeds},{n}"


def worst_case_budget(norm: str, columns: list[Cell], cfg: EvalConfig, n_images: int) -> str:
    """A worst case's budget: its images, the attacks it combines, and a digest of their budgets."""
    own = [c for c in columns if c.attack == "clean" or c.norm == norm]
    digest = hashlib.sha256(";".join(f"{c.attack}:{cell_budget(c, cfg, n_images)}" for c in own).encode()).hexdigest()
    return f"n={worst_case_sizes(columns, cfg, n_images)[norm]},of={'+'.join(c.attack for c in own)},budgets={digest[:8]}"


def worst_case_sizes(columns: list[Cell], cfg: EvalConfig, n_images: int) -> dict[str, int]:
    """Per norm, how many images the worst case covers: the first k that clean and every attack of
    that norm were computed on (the smallest `cell_size` among them)."""
    clean = [cell_size(c, cfg, n_images) for c in columns if c.attack == "clean"]
    return {norm: min(clean + [cell_size(c, cfg, n_images) for c in columns if c.norm == norm])
            for norm in dict.fromkeys(c.norm for c in columns if c.norm is not None)}


def worst_case(masks: dict[Cell, list[Tensor]]) -> dict[str, Tensor]:
    """Per norm, images [k] correct when clean and under every attack of that norm and every seed, over
    the first k images, k the shortest of those masks (the images every one of them saw)."""
    clean = [m for c, ms in masks.items() if c.attack == "clean" for m in ms]
    out = {}
    for norm in dict.fromkeys(c.norm for c in masks if c.norm is not None):
        own = clean + [m for c, ms in masks.items() if c.norm == norm for m in ms]
        k = min(m.numel() for m in own)
        out[norm] = torch.stack([m[:k] for m in own]).all(dim=0)
    return out


def _values(masks: dict[Cell, list[Tensor]], columns: list[Cell], n_seeds: int) -> Tensor:
    """Correct-image counts as one flat float64 vector: every (cell, seed) slot, then the worst cases;
    a deterministic cell repeats its one count so that every model's vector has the same length."""
    counts = [float(ms[min(s, len(ms) - 1)].sum()) for c in columns for ms in [masks[c]] for s in range(n_seeds)]
    worst = worst_case(masks)
    return torch.tensor(counts + [float(worst[norm].sum()) for norm in worst], dtype=torch.float64)


def _rows(stage: str, name: str, values: list[float], columns: list[Cell], cfg: EvalConfig, n_images: int) -> list[dict]:
    """Each row divides by the images its counts were taken on: `cell_size` for an attack, the
    `worst_case_sizes` for a worst case (its n says which first images those are)."""
    rows = []
    for k, cell in enumerate(columns):
        per_seed = values[k * cfg.seeds : (k + 1) * cfg.seeds]
        if not randomised(cell, cfg):
            per_seed = per_seed[:1]
        n = cell_size(cell, cfg, n_images)
        accs = [PERCENT * v / n for v in per_seed]
        rows.append({"stage": stage, "model": name, "attack": cell.attack, "code": attack(cell.attack).code(),
                     "norm": cell.norm, "eps": float(cell.eps), "budget": cell_budget(cell, cfg, n_images)}
                    | accuracy_fields(accs, n))
    eps = {c.norm: c.eps for c in columns}
    sizes = worst_case_sizes(columns, cfg, n_images)
    for (norm, n), count in zip(sizes.items(), values[len(columns) * cfg.seeds :]):
        low, high = wilson_interval(count, n)
        of = [c.attack for c in columns if c.norm == norm]
        rows.append({"stage": stage, "model": name, "attack": WORST_CASE, "code": ",".join(attack(a).code() for a in of),
                     "norm": norm, "eps": float(eps[norm]),
                     "budget": worst_case_budget(norm, columns, cfg, n_images), "accuracy": PERCENT * count / n, "n": n, "ci_low": low, "ci_high": high,
                     "of": of})
    return rows


@dataclass
class StagePlan:
    """One stage's white-box table as work: its models (sub0.., mixture), the columns each runs, and its
    images x [n, C, H, W], y [n] (the first eval.num_examples of the test set x, y whose digest is
    `test_split`)."""

    stage: str
    submodels: list[nn.Module]
    x: Tensor
    y: Tensor
    test_split: str
    columns: list[Cell]
    mixture_columns: list[Cell]
    cfg: EvalConfig
    seed: int

    def models(self) -> dict[str, tuple[nn.Module, list[Cell]]]:
        """name → (model, its columns): every submodel, then the mixture (it alone runs the mixture-only attacks)."""
        named = {f"sub{i}": (model, self.columns) for i, model in enumerate(self.submodels)}
        return named | {MIXTURE: (Mixture(self.submodels), self.mixture_columns)}


def stage_plan(stage: str, submodels: list[nn.Module], x: Tensor, y: Tensor, eval_cfg: EvalConfig, seed: int,
               attacks: list[str] | None = None) -> StagePlan:
    """The table of `stage` over the first eval.num_examples (0: all) of x [N, C, H, W], y [N], under
    `attacks` (default eval.attacks): mixture-only attacks (the record's, and eval.mixture_only) run on the
    mixture alone."""
    attacks = list(eval_cfg.attacks if attacks is None else attacks)
    test_split = images_digest(x, y)  # the split the table's images are drawn from, as a whole
    if eval_cfg.num_examples > 0:
        x, y = x[: eval_cfg.num_examples], y[: eval_cfg.num_examples]
    columns = cells([a for a in attacks if not attack(a).mixture_only and a not in eval_cfg.mixture_only], eval_cfg)
    return StagePlan(stage, submodels, x, y, test_split, columns, cells(attacks, eval_cfg), eval_cfg, seed)


def chunk_tasks(plan: StagePlan, name: str, model: nn.Module, k: int, cell: Cell) -> Tasks:
    """The work of one column `cell` (index `k` among `name`'s columns) of one model: a task per (seed, chunk),
    each drawing from its own streams (`chunk_generator`, and AutoAttack's seed of the same key), costed by
    the attack record's passes per image × the chunk's images (× the submodels for the mixture). A task
    returns its chunk's robustness mask (CPU bool [chunk size]), keyed (k, seed, chunk) for `plan_rows`."""
    cfg, seed = plan.cfg, plan.seed
    bounds = chunk_bounds(cell_size(cell, cfg, len(plan.y)), cfg.chunk_size)
    repeats = cfg.seeds if randomised(cell, cfg) else 1
    items = [(k, s, c) for s in range(repeats) for c in range(len(bounds))]
    per_image = attack(cell.attack).passes(cfg) * (len(plan.submodels) if name == MIXTURE else 1)

    def run(item: tuple[int, int, int]) -> Tensor:
        _, s, c = item
        start, end = bounds[c]
        aa_seed = derive_seed(seed, "autoattack", name, cell.norm, float(cell.eps), "chunk", c, "seed", s)
        return robust_mask(model, plan.x[start:end], plan.y[start:end], cell, cfg, chunk_generator(seed, name, cell, c, s),
                           plan.submodels, None, aa_seed).cpu()

    sizes = [bounds[c][1] - bounds[c][0] for _, _, c in items]
    threat = "" if cell.norm is None else f" {cell.norm} ε={cell.eps:g}"
    return Tasks(items, [per_image * n for n in sizes], run, sizes, f"{plan.stage} {name} {cell.attack}{threat}".strip())


def plan_tasks(plan: StagePlan) -> list[tuple[str, Tasks]]:
    """Every (model name, `chunk_tasks`) of the stage's table, model by model, column by column."""
    return [(name, chunk_tasks(plan, name, model, k, cell))
            for name, (model, columns) in plan.models().items() for k, cell in enumerate(columns)]


def plan_rows(plan: StagePlan, masks: dict[str, dict[tuple[int, int, int], Tensor]]) -> list[dict]:
    """The stage's rows (as `evaluate_stage` returns them) from every model's chunk masks (name → (k, seed,
    chunk) → mask)."""
    n = len(plan.y)
    rows = []
    for name, (_, columns) in plan.models().items():
        values = _values(_assemble(masks.get(name, {}), columns, plan.cfg, n), columns, plan.cfg.seeds).tolist()  # none: no columns
        rows += _rows(plan.stage, name, values, columns, plan.cfg, n)
    return _with_images(rows, plan.x, plan.y, plan.test_split)


def _with_images(rows: list[dict], x: Tensor, y: Tensor, test_split: str) -> list[dict]:
    # Each row's images as part of its basis: also what `dvtrain eval` checks the run's data against later.
    digests = {n: images_digest(x[:n], y[:n]) for n in {r["n"] for r in rows}}
    return [r | {"images": digests[r["n"]], "test_split": test_split} for r in rows]


def in_eval_mode(submodels: list[nn.Module]) -> Callable[[], None]:
    """Put `submodels` in eval mode (BatchNorm running statistics, as at test time); returns the call that
    hands them back in the modes they came in."""
    was_training = [model.training for model in submodels]
    for model in submodels:
        model.eval()

    def restore() -> None:
        for model, mode in zip(submodels, was_training):
            model.train(mode)

    return restore


def evaluate_stage(
    stage: str, submodels: list[nn.Module], x: Tensor, y: Tensor, eval_cfg: EvalConfig, seed: int,
    placement: Placement | None = None, attacks: list[str] | None = None, share: Share | None = None,
    phases: Phases | None = None,
) -> list[dict]:
    """Rows for each submodel and the mixture under each attack (default eval.attacks), then worst-case rows.

    x [N, C, H, W] in [0, 1], y [N]; the table uses the first eval.num_examples of them (all for 0), in
    chunks of eval.chunk_size, each attacked from its own random streams (`chunk_generator`).
    Two ways to use several processes, with the same numbers as one process:
    - `placement` (the training-time table): `submodels` are the ones this process owns; each process
      scores its own on every chunk, and all take part in attacking the mixture.
    - `share` (`dvtrain eval`, tools): every process holds every submodel; each (model, attack, seed,
      chunk) is a task of `dvtrain.eval.share` (`plan_tasks`), so every process returns every row.
    Models are scored in eval mode (BatchNorm running statistics, as at test time) and handed back in
    the mode they came in. `phases` shows a progress bar per (model, attack) and records its seconds
    (none by default). Raises NonFiniteOutput for a model with NaN/inf outputs, and DvtrainError
    for AutoAttack with submodels spread over several processes, or more processes than chunks.
    """
    placement = placement if placement is not None else LocalPlacement(len(submodels))
    plan = stage_plan(stage, submodels, x, y, eval_cfg, seed, attacks)
    if "autoattack" in [c.attack for c in plan.mixture_columns] and len(placement.owned) != placement.size:
        raise DvtrainError("AutoAttack runs in one process holding every submodel; drop autoattack from eval.attacks "
                           "for a multi-process training run and use `dvtrain eval RUN_DIR` afterwards")
    if share is not None and share.world > chunk_count(len(plan.y), eval_cfg):
        raise DvtrainError(too_many_processes(share.world, len(plan.y), eval_cfg))
    phases = phases if phases is not None else Phases(False)
    restore = in_eval_mode(submodels)
    try:
        for i, model in zip(placement.owned, submodels):
            check_finite(model, plan.x[: eval_cfg.batch_size], f"submodel {i + 1} of stage {stage}")
        if share is not None:
            masks: dict[str, dict] = {}
            for name, tasks in plan_tasks(plan):
                with phases.phase(tasks.label, sum(tasks.images)) as bar:
                    masks.setdefault(name, {}).update(zip(tasks.items, tasks.map(share, bar)))
            return plan_rows(plan, masks)
        columns, x, y = plan.columns, plan.x, plan.y
        owned = [_model_masks(f"sub{i}", model, x, y, columns, eval_cfg, seed, phases=phases, stage=stage)
                 for i, model in zip(placement.owned, submodels)]
        local = torch.stack([_values(m, columns, eval_cfg.seeds) for m in owned]).to(x.device)
        table = {f"sub{i}": v.tolist() for i, v in enumerate(placement.all_gather(local))}
        mixture = Mixture(submodels, placement)
        masks_ = _model_masks(MIXTURE, mixture, x, y, plan.mixture_columns, eval_cfg, seed, submodels, placement, phases,
                              stage)
        mixture_values = _values(masks_, plan.mixture_columns, eval_cfg.seeds).tolist()
    finally:
        restore()
    rows = [r for name, values in table.items() for r in _rows(stage, name, values, columns, eval_cfg, len(y))]
    rows += _rows(stage, MIXTURE, mixture_values, plan.mixture_columns, eval_cfg, len(y))
    return _with_images(rows, x, y, plan.test_split)


def too_many_processes(world: int, n_images: int, cfg: EvalConfig) -> str:
    """The one-line refusal of a launch with more processes than the table has chunks."""
    count = chunk_count(n_images, cfg)
    return (f"{world} processes share {count} chunk{'s' * (count != 1)} of eval.chunk_size={cfg.chunk_size} images "
            f"({n_images} test images); launch at most {count} processes or lower eval.chunk_size")

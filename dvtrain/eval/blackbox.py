"""Black-box transfer as the DVERGE paper measures it (Yang et al., NeurIPS 2020, §5 and appendix):
adversarial examples crafted on hold-out surrogate ensembles (3, 5 and 8 plain models), with momentum PGD,
M-DI²-FGSM and SGM, each with cross-entropy and CW-margin loss, at every ε of `eval.transfer.sweep_eps`;
scored on every submodel and the mixture of each stage, per example set and as "all" per ε (an image
counts only if it is classified correctly under every example set at that ε).

The surrogates (`dvtrain.eval.surrogates`) and the example sets (`dvtrain.eval.example_sets`) live in a
cache shared by every run on the same data, so vanilla, DVERGE, +AdvT and the baselines are scored on
identical examples. The surrogate mixture (log mean softmax) is attacked end to end; the CW margin on its
log-probabilities is max_{j≠y} log p̄_j − log p̄_y, which keeps pushing until the image is misclassified
(the reference's CW bug, REFERENCE_FACTS, stopped at p̄_y ≈ 0.905).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from pathlib import Path

import torch
from torch import Tensor, nn

from dvtrain.config import Config, TransferConfig
from dvtrain.data import Dataset
from dvtrain.digest import images_digest
from dvtrain.eval.progress import Phases
from dvtrain.eval.share import Share, Tasks, from_main, is_main, run_for_effect, run_work
from dvtrain.eval import example_sets, surrogates
from dvtrain.eval.surrogates import SurrogateTrainer
from dvtrain.eval.transfer import ensemble_predictions, percent
from dvtrain.eval.attacks.transfer import TRANSFER_ATTACKS, transfer_attack
from dvtrain.mixture import Mixture
from dvtrain.rng import stream

ALL_SETS = "all"  # correct under every example set at that ε: the reference's "all" column
ALL_BY_SURROGATE = "all_by_surrogate"  # the same per surrogate ensemble
LOAD_COST = 0.01  # an ensemble or set already in the cache only loads: next to nothing against crafting one
MIXTURE = "mixture"
LOSS_NAMES = {"ce": "CE", "cw": "CW"}


@dataclasses.dataclass
class ExampleSet:
    """One example set: `examples` [R, N, C, H, W] (R runs of the attack) crafted on surrogate ensemble
    `surrogate` ("ens<k>") with `attack` and `loss` at `eps`, for the protocol's N test images."""

    surrogate: str
    attack: str
    loss: str
    eps: float
    examples: Tensor

    def key(self) -> dict:
        return {"surrogate": self.surrogate, "attack": self.attack, "loss": self.loss, "eps": self.eps}


def blackbox_images(data: Dataset, tcfg: TransferConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The protocol's test images: the first `num_images` of a random order drawn from eval.transfer.seed
    (the same images as `shuffled_test_set(data, seed)` for a run of that seed). Returns x, y, indices."""
    order = torch.randperm(len(data.y_test), generator=stream(tcfg.seed, "eval", "images"))
    index = order if tcfg.num_images == 0 else order[: tcfg.num_images]
    device_index = index.to(data.y_test.device)
    return data.x_test[device_index], data.y_test[device_index], index


def attack_budget(attack: str, tcfg: TransferConfig) -> dict:
    """Everything besides the surrogate, loss, ε, seed and images that an attack's examples depend on: its
    record's budget (`dvtrain.eval.attacks.transfer`), the batch size (the random starts and M-DI²-FGSM's
    transforms are drawn batch by batch) and the record's code version. Raises DvtrainError for an
    unknown attack."""
    record = transfer_attack(attack)
    return {**record.budget(tcfg), "batch_size": tcfg.batch_size, "code": record.version}


def craft(surrogate: nn.Module, x: Tensor, y: Tensor, attack: str, loss: str, eps: float, budget: dict,
          generator: torch.Generator, batch_size: int) -> Tensor:
    """One run of `attack` (its record's `craft`) with `loss` at `eps` on `surrogate` (a model of images in
    [0, 1]): [N, C, H, W]. Batches draw from `generator` in order."""
    return transfer_attack(attack).craft(surrogate, x, y, loss, eps, budget, generator, batch_size)


def check_attacks(tcfg: TransferConfig) -> None:
    """Every name of eval.transfer.blackbox_attacks is a registered transfer attack (DvtrainError with the
    closest name otherwise): checked before any work."""
    for name in tcfg.blackbox_attacks:
        transfer_attack(name)


def applicable_attacks(tcfg: TransferConfig, surrogate_models: list[nn.Module], arch: str) -> tuple[list[str], list[str]]:
    """The configured attacks that apply to the surrogates, and a note for each that does not."""
    records = [transfer_attack(name) for name in tcfg.blackbox_attacks]
    return ([r.name for r in records if r.applies(surrogate_models)],
            [r.not_applicable.format(arch=arch) for r in records if not r.applies(surrogate_models)])


def prepare_blackbox(
    run_dir: Path, cfg: Config, tcfg: TransferConfig, data: Dataset, device: torch.device, train: SurrogateTrainer,
    phases: Phases | None = None, share: Share | None = None,
) -> tuple[list[ExampleSet], Tensor, dict] | None:
    """`blackbox_work` run to its end (`dvtrain.eval.share.run_work`)."""
    return run_work(blackbox_work(run_dir, cfg, tcfg, data, device, train, phases, share), share)


def blackbox_work(
    run_dir: Path, cfg: Config, tcfg: TransferConfig, data: Dataset, device: torch.device, train: SurrogateTrainer,
    phases: Phases | None = None, share: Share | None = None,
) -> Generator[Tasks, list, tuple[list[ExampleSet], Tensor, dict] | None]:
    """As work to share (it yields `Tasks`, `run_work` sends their results back): every example set of the protocol (read from the shared cache, or crafted and stored there once),
    the labels y [N] of its images, and a description for results.json (each stage's table's "protocol"): the
    protocol, each surrogate ensemble's folder, clean accuracy and own (white-box) accuracy per set.

    Under `share` (several processes) each surrogate ensemble is trained, and each example set crafted,
    by one rank into the shared cache (largest first to the least-loaded rank), and rank 0 then reads
    them all back; the other ranks return None. A set's random numbers come from its own stream, so the
    examples are the same whichever rank crafted them. `phases` times each ensemble's training (its
    stage loop shows its own epoch bars) and each set's crafting (a bar over its images)."""
    phases = phases if phases is not None else Phases(False)
    root = surrogates.cache_root(run_dir, tcfg)
    x, y, index = blackbox_images(data, tcfg)
    digest = surrogates.data_digest(data)
    sizes = list(dict.fromkeys(tcfg.surrogate_sizes))
    configs = {size: surrogates.surrogate_config(cfg, tcfg, size) for size in sizes}

    def ensemble(size: int) -> list[nn.Module]:
        with phases.phase(f"surrogate ensemble of {size}"):
            return surrogates.load_or_train(root, configs[size], data, device, train, digest)

    if share is not None and share.world > 1:  # each trained on one rank; then every rank reads every one
        # A cached ensemble only loads: rank 0 says which are, so that every rank assigns alike.
        cached = from_main(share, [surrogates.is_trained(root, configs[size], digest) for size in sizes])
        costs = [LOAD_COST if done else size for size, done in zip(sizes, cached)]
        yield Tasks(sizes, costs, run_for_effect(ensemble))
    models = {size: ensemble(size) for size in sizes}
    applicable = {size: applicable_attacks(tcfg, models[size], cfg.model.arch) for size in sizes}
    tasks = [(size, float(eps), attack, loss) for size in sizes for eps in tcfg.sweep_eps for attack in applicable[size][0]
             for loss in tcfg.blackbox_losses]

    def example_set(task: tuple[int, float, str, str]) -> ExampleSet:
        size, eps, attack, loss = task
        return surrogate_set(root, cfg, tcfg, configs[size], models[size], attack, loss, eps, x, y, index, phases, digest)

    def is_stored(task: tuple[int, float, str, str]) -> bool:
        size, eps, attack, loss = task
        folder, manifest = set_location(root, cfg, tcfg, configs[size], attack, loss, eps, x, y, index, digest)
        return example_sets.is_stored(folder, manifest)

    if share is not None and share.world > 1:
        cached = from_main(share, [is_stored(task) for task in tasks])
        costs = [LOAD_COST if done else size * transfer_attack(attack).cost(attack_budget(attack, tcfg))
                 for (size, _, attack, _), done in zip(tasks, cached)]
        yield Tasks(tasks, costs, run_for_effect(example_set))
    if not is_main(share):
        return None
    sets = [example_set(task) for task in tasks]
    attacks = {attack: attack_budget(attack, tcfg) for attack in dict.fromkeys(task[2] for task in tasks)}
    info: dict = {"n_images": len(y), "images": images_digest(x, y), "data": digest, "code": example_sets.FORMAT, "eps": list(tcfg.sweep_eps), "seed": tcfg.seed, "cache": str(root),
                  "steps": tcfg.blackbox_steps, "restarts": tcfg.blackbox_restarts, "sgm_gamma": tcfg.sgm_gamma,
                  "di_prob": tcfg.di_prob, "losses": list(tcfg.blackbox_losses), "surrogates": [],
                  # every setting each attack's examples depend on (its record's budget, batch size, code version),
                  # and their short hash: part of the black-box numbers' basis
                  "attacks": attacks, "attack_settings": example_sets.identity_hash(attacks),
                  "notes": list(dict.fromkeys(note for size in sizes for note in applicable[size][1]))}
    for size in sizes:
        own_sets = [s for s, task in zip(sets, tasks) if task[0] == size]
        info["surrogates"].append({
            "name": f"ens{size}", "size": size, "seed": configs[size].seed, "epochs": configs[size].vanilla.epochs,
            "dir": str(surrogates.surrogate_dir(root, configs[size], digest)),
            "clean_accuracy": percent(correct_under(models[size], x[None], y, tcfg.batch_size)[-1]),
            "sets": [s.key() for s in own_sets],
            "own_accuracy": [percent(correct_under(models[size], s.examples, y, tcfg.batch_size)[-1]) for s in own_sets]})
    return sets, y, info


def surrogate_set(root: Path, cfg: Config, tcfg: TransferConfig, scfg: Config, models: list[nn.Module], attack: str,
                  loss: str, eps: float, x: Tensor, y: Tensor, index: Tensor, phases: Phases | None = None,
                  digest: dict[str, str] | None = None) -> ExampleSet:
    """One example set of one surrogate ensemble (`scfg`, `models`): `attack` with `loss` at `eps` on the
    protocol's images x [N, C, H, W] (test-set indices `index`), from the cache under `root` when its
    manifest matches, else crafted on the ensemble's mixture from the set's own stream and stored."""
    name = f"ens{scfg.ensemble.size}"
    folder, manifest = set_location(root, cfg, tcfg, scfg, attack, loss, eps, x, y, index, digest)
    budget = manifest["budget"]

    def generate() -> Tensor:
        mixture = Mixture(models).eval()
        label = f"crafting {transfer_attack(attack).label} ({LOSS_NAMES[loss]}) at ε={eps:g} on {name}"
        with (phases or Phases(False)).phase(label, len(y) * budget["runs"]) as bar:
            runs = []
            for r in range(budget["runs"]):
                runs.append(craft(mixture, x, y, attack, loss, eps, budget, stream(tcfg.seed, "blackbox", name, attack, loss, eps, r),
                                  tcfg.batch_size))
                bar.update(len(y))
            return torch.stack(runs)

    return ExampleSet(name, attack, loss, eps, example_sets.load_or_generate(folder, manifest, generate, clean=x))


def set_location(root: Path, cfg: Config, tcfg: TransferConfig, scfg: Config, attack: str, loss: str, eps: float,
                 x: Tensor, y: Tensor, index: Tensor, digest: dict[str, str] | None) -> tuple[Path, dict]:
    """Where an example set lives in the cache under `root`, and the manifest that identifies it by content:
    the data's digest (`surrogates.data_digest`; computed from nothing here, so pass it), the digest of the
    attacked images x [N, C, H, W] and labels y [N] with their test-set indices, the surrogate ensemble,
    attack, loss, ε, seed and budget (batch size included); example_sets.FORMAT adds the code version."""
    if digest is None:
        raise ValueError("set_location needs the data digest (surrogates.data_digest(data))")
    folder = (Path(root) / example_sets.EXAMPLES / surrogates.data_folder(cfg, digest)
              / surrogates.surrogate_dir(root, scfg, digest).name)
    manifest = {"data": surrogates.data_identity(cfg, digest), "images": index.tolist(), "images_digest": images_digest(x, y),
                "surrogate": surrogates.surrogate_identity(scfg, digest), "attack": attack, "loss": loss, "eps": eps,
                "seed": tcfg.seed, "budget": attack_budget(attack, tcfg)}
    return folder, manifest


def correct_under(models: list[nn.Module], examples: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """[M + 1, N]: whether each submodel, then the mixture, classifies every run of `examples` [R, N, ...]
    correctly. `examples` may stay on the CPU (the sets of a whole protocol can be gigabytes): batches move."""
    right = torch.ones(len(models) + 1, len(y), dtype=torch.bool, device=y.device)
    for run in examples:
        for s in range(0, len(y), batch_size):
            batch = run[s : s + batch_size].to(y.device)
            right[:, s : s + batch_size] &= ensemble_predictions(models, batch) == y[s : s + batch_size]
    return right


def blackbox_table(submodels: list[nn.Module], sets: list[ExampleSet], y: Tensor, batch_size: int,
                   images: str | None = None) -> dict:
    """Accuracy (%) of each submodel and the mixture under every example set (correct under all its runs)
    and "all" per ε (correct under every set at that ε), as results.json's "blackbox"[stage]:
    {"models", "n_images", "sets": [{surrogate, attack, loss, eps}], "accuracy": [model][set],
     "eps": [ε], "all": [model][ε], "all_by_surrogate": {surrogate: [model][ε]} (every set of that
     surrogate ensemble at ε), "images": `images` (`dvtrain.digest.images_digest` of the test images and y)}."""
    correct = [correct_under(submodels, s.examples, y, batch_size) for s in sets]
    eps_grid = list(dict.fromkeys(s.eps for s in sets))
    models = [*(f"sub{i}" for i in range(len(submodels))), MIXTURE]

    def every(keep: Callable[[ExampleSet], bool]) -> list[list[float | None]]:
        """[model][ε]: correct under every set at ε that `keep` selects (None where it selects none)."""
        masks = [[c for c, s in zip(correct, sets) if s.eps == eps and keep(s)] for eps in eps_grid]
        both = [torch.stack(ms).all(dim=0) if ms else None for ms in masks]
        return [[None if a is None else percent(a[m]) for a in both] for m in range(len(models))]

    surrogates = list(dict.fromkeys(s.surrogate for s in sets))
    return {"models": models, "n_images": len(y), "sets": [s.key() for s in sets],
            "accuracy": [[percent(c[m]) for c in correct] for m in range(len(models))],
            "eps": eps_grid, ALL_SETS: every(lambda s: True), "images": images,
            ALL_BY_SURROGATE: {name: every(lambda s, name=name: s.surrogate == name) for name in surrogates}}


def all_accuracy(table: dict, model: str, eps: float) -> float | None:
    """The "all" accuracy (%) of `model` at `eps` in a black-box table; None when ε was not in the sweep
    or the table is of the older layout (one ε, not recorded in the table)."""
    if "all" not in table:
        return None
    for k, e in enumerate(table["eps"]):
        if abs(e - eps) < 1e-12:
            return table["all"][table["models"].index(model)][k]
    return None


def attack_label(name: str) -> str:
    """A transfer attack's label from its record, e.g. "momentum PGD" (the name where none is registered)."""
    record = TRANSFER_ATTACKS.get(name)
    return record.label if record else name


def set_label(s: dict) -> str:
    """A column header for an example set, e.g. "ens5 SGM CW"."""
    return f"{s['surrogate']} {attack_label(s['attack'])} {LOSS_NAMES.get(s['loss'], s['loss'])}"

"""What the settings need of the data's splits, checked before any work (issue 28, kind 9).

A setting that leaves a split empty, or smaller than what a stage needs, is refused with the numbers, before
any stage trains or any surrogate is crafted: an empty test split used to end, after every stage had trained,
in the table's `torch.cat(): expected a non-empty list`. The data's own sizes come from `dvtrain.data` (the
digits split is checked where it is drawn, with its fraction); this module holds the rules that relate the
other settings to those sizes. No torch import here.
"""

from __future__ import annotations

from dvtrain.config import Config, TransferConfig
from dvtrain.errors import DvtrainError

# The vulnerability-diversity matrix distills a target image towards the features of another one.
MIN_DIVERSITY_IMAGES = 2


class SplitError(DvtrainError):
    pass


def check_nonempty(n_train: int, n_test: int, dataset: str, where: str) -> None:
    """Both splits hold at least one image; `where` names the data (e.g. "under data/cifar-10-batches-py")."""
    for split, n in (("training", n_train), ("test", n_test)):
        if n == 0:
            raise SplitError(f"the {split} split of {' '.join(filter(None, (dataset, where)))} is empty (0 images; training {n_train}, test "
                             f"{n_test}); point data.root at the complete dataset")


def check_full_batches(cfg: Config, n_train: int, stages: list[str] | tuple[str, ...]) -> None:
    """With data.drop_last every step takes a full batch: a stage that trains (epochs > 0) with a batch size
    above the training split would run no step at all and save untrained weights as trained."""
    if not cfg.data.drop_last:
        return
    for stage in stages:
        section = cfg.section(stage)
        if section.epochs > 0 and section.batch_size > n_train:
            raise SplitError(
                f"{stage}.batch_size={section.batch_size} with data.drop_last=true leaves no full batch in the "
                f"{n_train} training images, so {stage} would train no step; set {stage}.batch_size <= {n_train} "
                "or data.drop_last=false")


def check_evaluation(cfg: Config, tcfg: TransferConfig, n_train: int, n_test: int) -> list[str]:
    """What `dvtrain eval` needs of the splits: the surrogate ensembles train as a vanilla stage on the
    training split (`check_full_batches`), the diversity matrix needs two test images. Returns notes for
    settings that ask for more images than the test split has (their tables count the n they got)."""
    check_full_batches(cfg, n_train, ["vanilla"])
    if cfg.eval.diversity.enabled and n_test < MIN_DIVERSITY_IMAGES:
        raise SplitError(f"eval.diversity needs pairs of {MIN_DIVERSITY_IMAGES} different test images, but the test "
                         f"split has {n_test}; set eval.diversity.enabled=false or use a larger test split")
    notes = []
    for key, asked in (("eval.transfer.num_images", tcfg.num_images), ("eval.num_examples", cfg.eval.num_examples),
                       ("eval.diversity.num_images", cfg.eval.diversity.num_images)):
        if asked > n_test:
            notes.append(f"dvtrain: note: {key}={asked} is more than the {n_test} test images: its tables use all "
                         f"{n_test} (each row gives its n)")
    return notes

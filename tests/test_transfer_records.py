"""Issue 26: a transfer attack is one record (dvtrain.eval.attacks.transfer). One defined here, registered
with one line, runs in the black-box protocol from its record alone: crafted into the content-addressed
cache, scored in the black-box table, labelled in results.md; a typo in the config's list is refused with
the closest name before any work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY
from dvtrain.config import TransferConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.errors import DvtrainError
from dvtrain.eval import blackbox
from dvtrain.eval.attacks import transfer
from dvtrain.eval.attacks.transfer import TRANSFER_ATTACKS, TransferAttack, batched, transfer_attack
from dvtrain.eval.attacks.mi_fgsm import momentum_pgd


def one_step(model, x, y, loss, eps, budget, generator, batch_size):
    """FGSM transferred: one signed step of ε (momentum PGD with one step and no random start)."""
    return batched(lambda xb, yb: momentum_pgd(model, xb, yb, eps, eps, 1, 0.0, False, generator, loss), x, y, batch_size)


FGSM_TRANSFER = TransferAttack("fgsm_transfer", "FGSM (transferred)", lambda t: {"steps": 1, "runs": 1}, one_step)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TRANSFER_ATTACKS, FGSM_TRANSFER.name, FGSM_TRANSFER)  # the one line a plug-in needs
    return FGSM_TRANSFER


def test_a_typo_is_refused_with_the_closest_name():
    with pytest.raises(DvtrainError, match="unknown transfer attack 'mi_pdg'; did you mean mi_pgd\\?"):
        transfer_attack("mi_pdg")
    with pytest.raises(DvtrainError, match="eval.transfer.blackbox_attacks: unknown transfer attack 'zzz'; choose from mi_pgd"):
        blackbox.check_attacks(TransferConfig(blackbox_attacks=["zzz"]))


def test_the_papers_attacks_are_records():
    assert {"mi_pgd", "m_di2_fgsm", "sgm"} <= set(TRANSFER_ATTACKS)
    assert all(a.kind == "transfer" and a.version >= 1 for a in TRANSFER_ATTACKS.values())
    budget = blackbox.attack_budget("mi_pgd", TransferConfig(blackbox_steps=7, blackbox_restarts=2))
    assert transfer.MI_PGD.cost(budget) == 14 and budget["code"] == transfer.MI_PGD.version


def test_an_attack_defined_outside_runs_in_the_blackbox_protocol_from_its_record(registered, tmp_path):
    from dvtrain.eval.report import evaluation_markdown
    from dvtrain.train.loop import train_in_process

    cfg = load_config("configs/digits_quickstart.yaml", [*TINY, "vanilla.epochs=1"])
    data = load_dataset(cfg.data)
    tcfg = TransferConfig(num_images=24, surrogate_sizes=[2], surrogate_epochs=1, sweep_eps=[0.1],
                          blackbox_attacks=["fgsm_transfer", "mi_pgd"], blackbox_losses=["ce"], blackbox_steps=2,
                          blackbox_restarts=1, cache_dir=str(tmp_path / "cache"))
    sets, y, protocol = blackbox.prepare_blackbox(tmp_path / "run", cfg, tcfg, data, torch.device("cpu"), train_in_process)
    assert [(s.attack, s.eps) for s in sets] == [("fgsm_transfer", 0.1), ("mi_pgd", 0.1)]
    ours = sets[0].examples
    assert ours.shape == (1, 24, *data.x_test.shape[1:])
    x = blackbox.blackbox_images(data, tcfg)[0]
    assert (ours[0] - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(ours[0], x)
    stored = sorted((tmp_path / "cache").rglob("fgsm_transfer_ce_eps0.1_*.safetensors"))
    assert len(stored) == 1  # in the content-addressed cache under its own name
    table = blackbox.blackbox_table(_models(data), sets, y, 12, protocol["images"])
    table["protocol"] = protocol
    md = evaluation_markdown({"blackbox": {"dverge": table}})
    assert "ens2 FGSM (transferred) CE" in md and "ens2 momentum PGD CE" in md
    # A setting of the record changes its key: another budget is another file.
    other = dataclasses.replace(FGSM_TRANSFER, budget=lambda t: {"steps": 1, "runs": 1, "variant": 2})
    TRANSFER_ATTACKS[other.name] = other
    assert blackbox.attack_budget("fgsm_transfer", tcfg) != {**FGSM_TRANSFER.budget(tcfg), "batch_size": tcfg.batch_size,
                                                             "code": 1}


def _models(data):
    from dvtrain.models import build_model

    torch.manual_seed(0)
    return [build_model("conv", data.channels, data.image_size, 10, data.mean, data.std).eval() for _ in range(2)]


def test_a_record_may_not_take_the_name_of_another_record():
    """A transfer record under a taken name would replace it silently (new-user finding: an in-process
    `register` of a different "mi_pgd" crafted clean images into the shared cache, which later evaluations
    reused as momentum PGD's). Refused: another transfer record's name, a white-box record's name. The same
    record again is a no-op."""
    mi_pgd = TRANSFER_ATTACKS["mi_pgd"]
    impostor = TransferAttack("mi_pgd", mi_pgd.label, mi_pgd.budget, lambda m, x, y, loss, eps, b, g, bs: x.clone())
    with pytest.raises(DvtrainError, match="transfer attack 'mi_pgd' is registered twice; rename one of them"):
        transfer.register(impostor)
    assert TRANSFER_ATTACKS["mi_pgd"] is mi_pgd and transfer.register(mi_pgd) is mi_pgd
    clash = TransferAttack("pgd_linf", "PGD", mi_pgd.budget, mi_pgd.craft)
    with pytest.raises(DvtrainError, match="transfer attack 'pgd_linf' has the name of a white-box attack; rename it"):
        transfer.register(clash)
    assert "pgd_linf" not in TRANSFER_ATTACKS

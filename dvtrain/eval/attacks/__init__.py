"""Attacks as records. `transfer`: the black-box protocol's transfer attacks (crafted on surrogate
ensembles), one `TransferAttack` record each, registered by name. The white-box attacks' records are
still `dvtrain.eval.attack_registry` (to move here)."""

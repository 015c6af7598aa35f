"""Attacks as records. `transfer`: the black-box protocol's transfer attacks (crafted on surrogate
ensembles), one `TransferAttack` record each, registered by name. The white-box attacks' records are
`dvtrain.eval.attack_registry`. Plug-ins register either kind through the entry-point group
`dvtrain.attacks`."""

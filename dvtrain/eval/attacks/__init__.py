"""Attacks as records, and the attack code they run; every attack of evaluation lives here.

- `registry`: the white-box attacks' records (`WhiteboxAttack`: name, norm, loss, budget string, code
  version, mixture-only, runner) and the check of the config's attack lists against them;
- `transfer`: the black-box protocol's transfer attacks, one `TransferAttack` record each;
- `adaptive`: the ensemble attack on the mixture (after MORA); `autoattack`: the trusted AutoAttack
  (pyautoattack) as a per-image robust mask; `mi_fgsm`: momentum PGD, M-DI²-FGSM and SGM, the transfer
  attacks' shared update. PGD and FGSM are `dvtrain.attacks` (training's adversarial examples use them too).

Plug-ins register either kind of record through the entry-point group `dvtrain.attacks`. `registry` imports
no torch, so results files and `dvtrain compare` read names and headers without loading it."""

"""Training: the generic stage loop (`loop`), the stages (`registry`: vanilla, adp, gal, trs, dverge,
dverge_advt), the DVERGE step (`dverge`), its engines and feature distillation, and the optimizers."""

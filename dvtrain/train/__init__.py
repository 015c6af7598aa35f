"""Training: the generic stage loop (`loop`), the stages (`registry`: vanilla, adp, gal, trs, dverge,
dverge_advt), the DVERGE step (`dverge`), its engines, and the optimizers (feature distillation is in the core,
`dvtrain.distill`, since evaluation's diversity matrix uses it too)."""

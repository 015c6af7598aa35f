"""Training: the generic stage loop (`loop`, with the frame around each step in `frame`), the stage
contract (`stage`), the stages (registered in `dvtrain.stages`: vanilla, adp, gal, trs, dverge,
dverge_advt), the DVERGE step (`dverge`), its engines, and the optimizers (feature distillation is in the core,
`dvtrain.distill`, since evaluation's diversity matrix uses it too)."""

"""The tables of `dvtrain eval`, each one record behind one contract (`dvtrain.eval.tables.contract.Table`),
found through the registry (`dvtrain.eval.tables.registry`): white-box, transferability, black-box, ε sweep,
vulnerability diversity, gradient-masking checks, and any table a plug-in registers. No table imports
another; a table reads another's results only through the entries handed to its `assemble`."""

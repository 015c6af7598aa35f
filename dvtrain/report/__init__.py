"""Reporting, apart from evaluation: `dvtrain compare` and the offline W&B reader. It reads results
through the store (`dvtrain.results`) and W&B; it computes no robustness number and imports no torch."""

"""Evaluation: attacks and the robustness tables of submodels and their mixture. Imports no training code."""

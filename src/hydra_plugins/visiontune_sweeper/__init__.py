"""Hydra finds plugins only under `hydra_plugins`: this package points it at visiontune's sweepers (optuna, grid)."""

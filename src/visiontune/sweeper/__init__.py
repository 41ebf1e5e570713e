"""visiontune's Optuna sweeper for Hydra (Optuna >= 4, ask/tell, any Hydra launcher).

- `space`: Hydra's sweep grammar (interval, tag(log, ...), choice, range) as Optuna distributions.
- `storage`: storage URLs and journal files, heartbeats and the retry of a killed sweeper's trials, pruners.
- `trial`: the trial side: per-epoch reports, pruning, the run dir's `optuna_trial.json`.
- `pruning`: the Lightning callback, and `trial_callbacks(cfg)`, which train.py adds to its callbacks.
- `core`: the sweeper itself (Hydra finds it as hydra_plugins.visiontune_sweeper...OptunaSweeper).
- `outputs`: the end of a study: plots and best.yaml.
- `grid`: the default sweeper of a plain multirun: Hydra's basic one, every job checked before the first.
- `preflight`: what both check first: Optuna installed, a launcher that can run here.
- `summary`: the Hydra callback that writes summary.csv after every job and at the end.

Importing this package stays cheap (Hydra scans plugins on every start): Optuna and Lightning load
on use.
"""

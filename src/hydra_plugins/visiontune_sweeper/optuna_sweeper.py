"""`hydra.sweeper._target_` for visiontune's Optuna sweeper (the code is in visiontune.sweeper.core).

Hydra instantiates sweepers only from classes defined under `hydra_plugins`, so this subclass
is the name Hydra sees. Keep this module cheap to import: Hydra imports it on every start.
"""

from visiontune.sweeper import core


class OptunaSweeper(core.OptunaSweeper):
    """Optuna >= 4 through ask/tell, launching trials with the configured Hydra launcher."""

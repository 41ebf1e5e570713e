"""`hydra.sweeper._target_` of conf/hydra/sweeper/grid.yaml (the code is in visiontune.sweeper.grid).

Hydra instantiates sweepers only from classes defined under `hydra_plugins`, so this subclass is
the name Hydra sees. Keep this module cheap to import: Hydra imports it on every start.
"""

from visiontune.sweeper import grid


class GridSweeper(grid.GridSweeper):
    """Hydra's basic sweeper, with every job's config checked before the first job starts."""

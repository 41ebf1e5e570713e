"""The grid sweeper (conf/hydra/sweeper/grid.yaml, every command's default): Hydra's basic sweeper,
every combination of the sweep overrides, checked before the first job.

Hydra's basic sweeper composes each batch before launching it, and the first bad job then ends the sweep
midway (`-m data.folds=3 data.fold=0,5` trains fold 0, then stops at fold 5). This one composes
every job of every batch first and runs the command's own config check on each (`checks`: the
check's dotted path by config name, from grid.yaml), so one bad job ends the
sweep before any job starts, with one line that names its overrides and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper as HydraBasicSweeper
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from visiontune.errors import UserError, one_line
from visiontune.sweeper import preflight


class GridSweeper(HydraBasicSweeper):
    """Hydra's BasicSweeper; `checks` maps a config name (train, eval, ...) to its config check."""

    def __init__(self, max_batch_size: int | None = None, params: Any = None, checks: Any = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.checks = dict(checks or {})

    def sweep(self, arguments: list[str]) -> Any:
        """Check every job, then Hydra's sweep; bad input ends with one line on stderr and exit code 2,
        before the sweep dir is written or any job starts."""
        try:
            preflight.check_launcher(self.config)
            self.check_jobs(arguments)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch) -> None:
        """Nothing left to do: `check_jobs` composed every job before the sweep began."""

    def check_jobs(self, arguments: list[str]) -> None:
        """Compose every job of the sweep (as Hydra's sweep will split it) and run the command's check on each."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([*self._parse_config(), *arguments])
        try:
            jobs = [job for chunk in self.split_arguments(parsed, None) for job in chunk]
        except HydraException as exc:  # interval(...): a search space, not a list
            raise UserError(
                f"{one_line(exc)}: a grid takes lists (key=a,b) and range(...); search an interval with "
                "hparams_search=optuna"
            ) from None
        for number, overrides in enumerate(jobs):
            job = f"job {number} of {len(jobs)} ({' '.join(overrides)})"
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(
                    master_config=self.config, sweep_overrides=overrides
                )
            except ConfigCompositionException as exc:  # an unknown option: the entry point lists the options
                raise ConfigCompositionException(f"{job}: {exc}") from exc.__cause__
            problem = self.job_problem(number, cfg)
            if problem:
                raise UserError(f"{job}: {problem}. No job was started")

    def job_problem(self, number: int, cfg) -> str | None:
        """Why job `number`, whose composed config is `cfg`, fails its command's check; None when it passes."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_method

        check = self.checks.get(str(self.config.hydra.job.config_name))
        if not check:
            return None
        with open_dict(cfg):  # what the launcher sets, so that ${hydra:runtime.output_dir} resolves
            cfg.hydra.job.num = number
            cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir))
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        hydra_config, master = HydraConfig.instance(), HydraConfig.instance().cfg
        hydra_config.set_config(cfg)
        try:
            get_method(check)(task_cfg)
        except (UserError, OmegaConfBaseException) as exc:  # a bad value; a required one not given
            return one_line(exc)
        finally:
            hydra_config.cfg = master
        return None

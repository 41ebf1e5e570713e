"""Run by test_ddp_soft_freeze (not collected by pytest): freeze_unfreeze under 2-process gloo DDP.

Each rank saves its backbone weights at the end of every epoch into OUT/rank<r>_epoch<e>.pt.
Lightning's "ddp" launcher re-runs this script for rank 1 with the same argv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_run  # noqa: E402


class SaveEachEpoch(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def _save(self, trainer, pl_module, tag: str) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "initial")

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer, model, dm, _ = make_run(
        {"name": "freeze_unfreeze", "unfreeze_at_epoch": 1},
        epochs=2,
        callbacks=[SaveEachEpoch(out)],
        strategy="ddp",
        devices=2,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)
    assert model.freeze_schedule.soft, "DDP must use the soft freeze"

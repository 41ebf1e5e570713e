"""`visiontune-backbones [NAME ...]`: list the backbones visiontune can build, with their layer groups.

The backbones themselves are built in `visiontune.models.backbones`.
"""

from __future__ import annotations

import argparse

from visiontune.cli import fail
from visiontune.errors import UserError
from visiontune.models.backbones import LITE_NAMES, TORCHVISION_NAMES, create_backbone, weights_status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List the backbones visiontune can build.")
    parser.add_argument(
        "names", nargs="*", help="backbones to describe, with their layer groups (default: all)"
    )
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="visiontune backbones (top removed)")
    for col in ("name", "params", "features", "groups", "input", "pretrained weights here"):
        table.add_column(col)
    described = []
    for name in args.names or list(TORCHVISION_NAMES) + list(LITE_NAMES):
        try:
            backbone = create_backbone(name, pretrained=False)
            status = weights_status(name)
        except UserError as exc:
            fail(exc)
        params = sum(p.numel() for p in backbone.parameters())
        size = backbone.data_config["input_size"][-1]
        table.add_row(
            name,
            f"{params / 1e6:.1f}M",
            str(backbone.num_features),
            str(len(backbone.groups)),
            str(size),
            status,
        )
        described.append(backbone)
    console = Console(width=160)
    console.print(table)
    if args.names:  # the layer groups, which finetune.groups and finetune.pattern select from
        for backbone in described:
            console.print(
                f"{backbone.name} groups (input -> output): "
                + ", ".join(f"{i}:{g.name}" for i, g in enumerate(backbone.groups))
            )
    print(
        "Any timm model: timm:<name> (e.g. timm:resnet18, timm:convnext_nano); a local file: file:<path>@<arch>"
    )


if __name__ == "__main__":
    main()

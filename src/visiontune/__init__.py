"""visiontune: fine-tune pretrained image models with Lightning and Hydra."""

__version__ = "0.1.0"

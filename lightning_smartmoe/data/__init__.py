"""Token corpora and the LightningDataModule."""

from lightning_smartmoe.data.corpus import load_splits
from lightning_smartmoe.data.datamodule import TokenDataModule, TokenWindows

__all__ = ["TokenDataModule", "TokenWindows", "load_splits"]

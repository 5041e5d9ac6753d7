"""Data: sources (digits, image folders, Hugging Face datasets), timm transforms, seeded loaders."""

from distill.data.device import Finish
from distill.data.loaders import Transformed, eval_loader, train_loader
from distill.data.sources import ALIASES, DataSplits, ImageSource, Share, open_dataset
from distill.data.transforms import NORMS, Preprocess, eval_transform, measure_norm, train_transform

__all__ = ["ALIASES", "DataSplits", "Finish", "Preprocess", "ImageSource", "NORMS", "Transformed", "eval_loader", "eval_transform",
           "measure_norm", "open_dataset", "Share", "train_loader", "train_transform"]

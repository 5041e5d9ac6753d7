"""Weights on disk: distill checkpoints, pretrained sources, timm model names and labels."""

"""trm_lightning: encoder-based Tiny Recursive Models on ARC-AGI, with PyTorch Lightning."""

__version__ = "0.1.0"

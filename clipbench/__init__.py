"""clipbench: evaluate CLIP-like image-text models with the CLIP paper's protocols."""

__version__ = "0.1.0"

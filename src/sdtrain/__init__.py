"""sdtrain: train Stable Diffusion 1.x/2.x models and prepare their data (version only)."""

__version__ = "0.1.0"

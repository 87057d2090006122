"""sdtrain: train Stable Diffusion 1.x/2.x models and prepare their data."""

from sdtrain.lazy_packages import install as _install_lazy_packages

__version__ = "0.1.0"

_install_lazy_packages()  # diffusers' model-family packages import a model when it is used

"""The lazy diffusers packages: same classes, fewer imports, the eager behaviour on demand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sdtrain.lazy_packages import lazy_names


def _probe(code: str, eager: bool = False) -> dict:
    """Run `code` (which sets `out`) in a fresh interpreter; returns `out` as JSON."""
    env = {**os.environ, "SDTRAIN_EAGER_DIFFUSERS": "1" if eager else "0"}
    script = "import json, sys\nimport sdtrain\n" + textwrap.dedent(code)
    script += "\nprint(json.dumps(out))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reads_a_table_of_exports():
    source = textwrap.dedent(
        '''
        """doc"""
        from ...utils import is_torch_available

        if is_torch_available():
            from .unet_2d import UNet2DModel
            from .motion import MotionAdapter, UNetMotionModel as Motion
        '''
    )
    assert lazy_names(source) == {
        "UNet2DModel": "unet_2d",
        "MotionAdapter": "motion",
        "Motion": "motion",
    }


@pytest.mark.parametrize(
    "source",
    [
        "from .a import *\n",
        "X = 1\nfrom .a import A\n",
        "if is_flax_available():\n    from .a import A\n",
        "if is_torch_available():\n    from .a import A\nelse:\n    from .b import A\n",
        "def broken(:\n",
    ],
)
def test_anything_but_exports_is_imported_as_usual(source):
    assert lazy_names(source) is None


def test_a_unet_no_longer_imports_every_model_family():
    code = """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        out = {
            "dit": "diffusers.models.transformers.dit_transformer_2d" in sys.modules,
            "asym": "diffusers.models.autoencoders.autoencoder_asym_kl" in sys.modules,
            "stats_run": "scipy.stats._stats_py" in sys.modules,  # its code has run
            "unet": UNet2DConditionModel.__module__,
        }
    """
    lazy, eager = _probe(code), _probe(code, eager=True)
    assert eager["dit"] and eager["asym"] and eager["stats_run"]  # what the opt-out keeps
    assert not lazy["dit"] and not lazy["asym"] and not lazy["stats_run"]
    assert lazy["unet"] == eager["unet"] == "diffusers.models.unets.unet_2d_condition"


def test_every_export_and_the_eager_namespace_stay_reachable():
    code = """
        import diffusers.models.transformers as t
        from diffusers.models.autoencoders import AsymmetricAutoencoderKL
        from diffusers.models import ControlNetModel, SD3Transformer2DModel
        import scipy.stats
        from scipy.stats import beta
        names = [n for n in dir(t) if n[0].isupper()]
        out = {
            "same": t.SD3Transformer2DModel is SD3Transformer2DModel,
            "asym": AsymmetricAutoencoderKL.__name__,
            "controlnet": ControlNetModel.__module__,
            "exports": len(names),
            "resolved": all(getattr(t, n).__name__ == n for n in names if "Model" in n),
            "helper": t.is_torch_available(),  # not a listed export: the real __init__ runs
            "cdf": scipy.stats.norm.cdf(0.0),
            "beta": type(beta).__name__,
        }
    """
    lazy = _probe(code)
    assert lazy["same"] and lazy["resolved"] and lazy["helper"]
    assert lazy["exports"] > 50
    assert lazy["asym"] == "AsymmetricAutoencoderKL"
    assert lazy["controlnet"] == "diffusers.models.controlnets.controlnet"
    assert lazy["cdf"] == 0.5 and lazy["beta"] == "beta_gen"

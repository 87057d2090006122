"""XTI layer states: one conditioning per cross-attention site, routed by attention processors."""

from __future__ import annotations

import pytest
import torch

from sdtrain.methods.base import Conditioning
from sdtrain.models.bundle import FamilyInfo
from sdtrain.models.layer_states import LayerStatesProcessor, cross_attention_sites


def sd1_shaped_unet():
    """SD1's block layout (3 cross-attention down blocks x 2, mid, 3 up blocks x 3), tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


FAMILY = FamilyInfo(
    name="sd1", prediction_type="epsilon", resolution=64, latent_scale=1.0, text_width=16
)


@pytest.fixture(scope="module")
def unet():
    return sd1_shaped_unet()


def inputs():
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 5, 16, generator=g)
    return noisy, torch.tensor([3, 900]), hidden


def test_sites_are_in_the_reference_order(unet):
    sites = cross_attention_sites(unet)
    assert len(sites) == 16
    blocks = [name.split(".attentions")[0] for name in sites]
    assert blocks == (
        ["down_blocks.0"] * 2
        + ["down_blocks.1"] * 2
        + ["down_blocks.2"] * 2
        + ["mid_block"]
        + ["up_blocks.1"] * 3
        + ["up_blocks.2"] * 3
        + ["up_blocks.3"] * 3
    )
    assert all(name.endswith("attn2.processor") for name in sites)


def test_equal_layer_states_give_the_plain_prediction_bit_for_bit(unet):
    noisy, t, hidden = inputs()
    with torch.no_grad():
        plain = FAMILY.predict(unet, noisy, t, Conditioning(hidden))
        routed = FAMILY.predict(unet, noisy, t, Conditioning(hidden, layer_states=[hidden] * 16))
        plain_after = FAMILY.predict(unet, noisy, t, Conditioning(hidden))
    assert torch.equal(plain, routed)
    assert torch.equal(plain, plain_after)  # installed wrappers leave the plain path unchanged
    assert all(isinstance(p, LayerStatesProcessor) for p in unet.attn_processors.values())


def test_each_site_reads_its_own_entry(unet):
    noisy, t, hidden = inputs()
    other = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = FAMILY.predict(unet, noisy, t, Conditioning(hidden, layer_states=[hidden] * 16))
        # the mid site (index 6) gets other states: the output changes, and equals running the
        # mid block's cross-attention with `other` as encoder_hidden_states
        states = [hidden] * 16
        states[6] = other
        moved = FAMILY.predict(unet, noisy, t, Conditioning(hidden, layer_states=states))
        mid = unet.mid_block.attentions[0].transformer_blocks[0].attn2
        seen = {}

        def record(module, args, kwargs, out) -> None:
            seen["ehs"] = kwargs["encoder_hidden_states"]

        hook = mid.register_forward_hook(record, with_kwargs=True)
        try:
            FAMILY.predict(unet, noisy, t, Conditioning(hidden, layer_states=states))
        finally:
            hook.remove()
    assert not torch.equal(base, moved)
    assert mid.processor.index == 6
    assert unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.processor.index == 15
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor.index is None
    # the module is called with the plain states; its processor swaps in entry 6
    assert torch.equal(seen["ehs"], hidden)


def test_wrong_number_of_layer_states_is_refused(unet):
    noisy, t, hidden = inputs()
    with pytest.raises(ValueError, match="3 layer states for 16 cross-attention sites"):
        FAMILY.predict(unet, noisy, t, Conditioning(hidden, layer_states=[hidden] * 3))


def test_gradients_reach_each_layer_state(unet):
    noisy, t, hidden = inputs()
    states = [hidden.clone().requires_grad_(True) for _ in range(16)]
    FAMILY.predict(unet, noisy, t, Conditioning(hidden, layer_states=states)).sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in states)

"""The global-block variants of the paper's ablation (section 5)."""

import numpy as np
import pytest
import torch

from napari_gama_ir import create_model, load_checkpoint, save_checkpoint
from napari_gama_ir.model import GamaBlock
from napari_gama_ir.model.global_blocks import (
    GLOBAL_BLOCKS,
    Gama1dBlock,
    MultiplicativeGamaBlock,
    SqueezeExcite,
    make_global_block,
)

from .conftest import make_tiny_model

GLOBAL_VARIANTS = ("gama", "squeeze_excite", "gama_1d", "gama_multiplicative")


def _far_pixel_reach(block, far=(23, 0), size=24):
    """How much output pixel (0, 0) changes when pixel ``far``, beyond any 3x3/7x7 reach, changes."""
    torch.manual_seed(0)
    x = torch.rand(1, 6, size, size) + 0.5
    moved = x.clone()
    moved[..., far[0], far[1]] += 1.0
    with torch.no_grad():
        return float((block(moved) - block(x))[..., 0, 0].abs().max())


def _sized(block):
    with torch.no_grad():  # give every weight a size that shows (some start at zero)
        for parameter in block.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.1)
    return block


@pytest.mark.parametrize("kind", GLOBAL_VARIANTS)
def test_global_variants_reach_along_the_whole_column(kind):
    assert _far_pixel_reach(_sized(make_global_block(kind, 6))) > 1e-4


def test_one_gama_block_reaches_its_row_and_column_and_two_reach_everywhere():
    # A far pixel off the output's row and column changes only its own column's and row's means,
    # which the 7x7 convs carry 3 positions: one block does not see it, two stacked blocks do.
    one = _sized(GamaBlock())
    assert _far_pixel_reach(one, far=(23, 23)) == 0
    assert _far_pixel_reach(one, far=(0, 23)) > 1e-4
    assert _far_pixel_reach(torch.nn.Sequential(one, _sized(GamaBlock())), far=(23, 23)) > 1e-4


def test_identity_has_no_reach_and_no_parameters():
    block = make_global_block("identity", 6)
    assert _far_pixel_reach(block) == 0 and not list(block.parameters())


def test_multiplicative_gama_multiplies_the_maps_the_additive_block_adds():
    additive, multiplicative = GamaBlock(), MultiplicativeGamaBlock()
    multiplicative.load_state_dict(additive.state_dict())
    x = torch.rand(2, 5, 9, 11)
    with torch.no_grad():
        a, b, c = additive.processed_means(x)
        assert torch.allclose(additive(x), x + a + b + c)
        assert torch.allclose(multiplicative(x), x * a * b * c)


def test_squeeze_excite_rescales_channels_by_their_means():
    block = SqueezeExcite(4)
    x = torch.rand(1, 4, 8, 8)
    with torch.no_grad():
        scale = block.conv.weight[:, :, 0, 0] @ x.mean((2, 3))[0] + block.conv.bias
        assert torch.allclose(block(x), x * scale[None, :, None, None], atol=1e-6)


def test_gama_1d_adds_one_vector_per_dimension():
    block = Gama1dBlock()
    x = torch.rand(1, 5, 7, 9)
    with torch.no_grad():
        added = block(x) - x
    # The added term is a sum of a C vector, an H vector and a W vector: its second differences
    # across two dimensions at once vanish.
    assert torch.allclose(added[:, 1:, 1:] - added[:, 1:, :-1] - added[:, :-1, 1:] + added[:, :-1, :-1],
                          torch.zeros(1, 4, 6, 9), atol=1e-6)
    assert added.std() > 0


@pytest.mark.parametrize("kind", GLOBAL_BLOCKS)
def test_networks_with_each_block_restore_any_shape_and_round_trip(kind, tmp_path):
    model = make_tiny_model(3, global_block=kind)
    x = torch.rand(1, 3, 21, 35)
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / kind))
    assert loaded.config.global_block == kind
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_parameter_counts_differ_by_the_block_alone():
    counts = {kind: sum(p.numel() for p in create_model("gama_ir_xs", global_block=kind).parameters())
              for kind in GLOBAL_BLOCKS}
    depth = create_model("gama_ir_xs").config.depth
    assert counts["gama"] - counts["identity"] == 147 * depth
    assert counts["gama_multiplicative"] == counts["gama"]
    assert counts["gama_1d"] - counts["identity"] == 3 * (7 * 4 + 4 + 7 * 4 + 1) * depth
    # GAMA-IR-XS: width 24, one block per level, 4 middle blocks; SE sees width * 2**level channels.
    channels = [24, 48, 96] + [192] * 4 + [96, 48, 24]
    assert counts["squeeze_excite"] - counts["identity"] == sum(c * c + c for c in channels)


def test_local_means_only_for_gama_blocks():
    make_tiny_model(1, global_block="gama_multiplicative").set_mean_mode("local")
    for kind in ("identity", "squeeze_excite", "gama_1d"):
        model = make_tiny_model(1, global_block=kind)
        with pytest.raises(ValueError, match="GAMA blocks only"):
            model.set_mean_mode("local")
        model.set_mean_mode("global")  # what the engine always asks for by default


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match="global_block must be one of"):
        make_tiny_model(1, global_block="attention")


def test_shipped_weights_still_load_with_the_block_factory():
    model = create_model("gama_ir_xs-denoise-rgb", pretrained=True)
    assert isinstance(model.encoders[0][0].gama, GamaBlock)
    assert np.isfinite(sum(float(p.detach().sum()) for p in model.parameters()))

import pytest
import torch

from napari_gama_ir import create_model, list_models
from napari_gama_ir.model import GamaBlock, GamaIR, GamaIRConfig
from napari_gama_ir.model.gama import window_mean
from napari_gama_ir.model.layers import LayerNorm2d, layer_norm_by_passes
from napari_gama_ir.model.network import Upsample

from .conftest import make_tiny_model, tiny_config


def test_gama_block_has_147_parameters():
    block = GamaBlock()
    assert sum(p.numel() for p in block.parameters()) == 147
    assert all(conv.bias is None for conv in (block.conv_channel, block.conv_height, block.conv_width))


def test_gama_block_matches_the_papers_definition():
    torch.manual_seed(0)
    block = GamaBlock()
    x = torch.randn(2, 5, 9, 11)
    # Reference written from section 4.2: means over C, H, W; transpose; 7x7 convs; back; add.
    c_map = block.conv_channel(x.mean(1, keepdim=True))  # 1 x H x W
    h_map = block.conv_height(x.mean(2, keepdim=True).transpose(1, 2)).transpose(1, 2)  # C x 1 x W
    w_map = block.conv_width(x.mean(3, keepdim=True).transpose(1, 3)).transpose(1, 3)  # C x H x 1
    expected = x + c_map + h_map + w_map
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-6)
        # channels_last in, as the engine runs on a CPU: the maps added follow that layout (the fast
        # kernel for the broadcast adds), and so does the output.
        x_last = x.contiguous(memory_format=torch.channels_last)
        assert all(m.is_contiguous(memory_format=torch.channels_last) for m in block.processed_means(x_last))
        out_last = block(x_last)
        assert out_last.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out_last, expected, atol=1e-6)
    assert block(x).shape == x.shape


def test_gama_block_reaches_whole_rows_and_columns_and_two_reach_everything():
    torch.manual_seed(0)
    first, second = GamaBlock(), GamaBlock()
    x = torch.zeros(1, 4, 32, 32, requires_grad=True)
    first(x)[0, :, 0, 0].sum().backward()
    # Means over H and W carry a whole column and a whole row (plus the 7x7 conv's reach).
    assert x.grad[0, :, 31, 2].abs().sum() > 0 and x.grad[0, :, 2, 31].abs().sum() > 0
    assert x.grad[0, :, 31, 31].abs().sum() == 0
    x.grad = None
    second(first(x))[0, :, 0, 0].sum().backward()
    assert x.grad[0, :, 31, 31].abs().sum() > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_normalises_each_pixels_channels(channels_last):
    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = x.mean(1, keepdim=True)
    variance = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(variance + 1e-6) * norm.weight[:, None, None] + norm.bias[:, None, None]
    with torch.no_grad():
        assert torch.allclose(norm(x), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_by_passes_matches_the_fused_kernel_with_gradients(dtype):
    """The GPU path for channel counts that are not a multiple of 4, run here on the CPU.

    Like autocast's layer_norm it computes in float32, so a bfloat16 input is compared with the
    fused kernel on the same values in float32.
    """
    torch.manual_seed(0)
    norm = LayerNorm2d(42)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 42, 9, 11) * 3 + 1).to(dtype).requires_grad_()
    reference_input = x.detach().float().requires_grad_()
    fused = norm(reference_input)  # the CPU takes the fused kernel
    fused.square().sum().backward()
    expected_grads = [t.grad.clone() for t in (reference_input, norm.weight, norm.bias)]
    norm.weight.grad = norm.bias.grad = None
    passes = layer_norm_by_passes(x, norm.weight, norm.bias, norm.eps)
    passes.square().sum().backward()
    assert passes.dtype == torch.float32
    assert torch.allclose(passes, fused, atol=1e-5)
    for expected, t in zip(expected_grads, (x, norm.weight, norm.bias)):
        assert torch.allclose(t.grad.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_on_the_cpu_is_the_1x1_conv_and_pixel_shuffle_with_gradients(channels_last):
    """The CPU runs the up-sampling as one transposed convolution; it must be the paper's two steps."""
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    expected = torch.nn.functional.pixel_shuffle(torch.nn.functional.conv2d(x, up[0].weight), 2)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, up[0].weight))
    out = up(x)
    assert out.shape == (2, 3, 10, 14)
    assert torch.allclose(out, expected, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(out.square().sum(), (x, up[0].weight)), expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_window_mean_is_global_for_long_windows_and_local_otherwise():
    x = torch.randn(1, 3, 20, 7)
    assert torch.allclose(window_mean(x, 2, None), x.mean(2, keepdim=True))
    assert torch.allclose(window_mean(x, 2, 50), x.mean(2, keepdim=True))
    local = window_mean(x, 2, 5)
    for i in range(20):
        start = min(max(i - 2, 0), 15)
        assert torch.allclose(local[:, :, i], x[:, :, start : start + 5].mean(2), atol=1e-6)


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (37, 51), (64, 64), (65, 31)])
def test_any_size_is_padded_and_cropped_back(height, width):
    model = make_tiny_model(1)
    with torch.no_grad():
        out = model(torch.rand(2, 1, height, width))
    assert out.shape == (2, 1, height, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_any_channel_count(channels):
    model = make_tiny_model(channels)
    with torch.no_grad():
        assert model(torch.rand(1, channels, 24, 40)).shape == (1, channels, 24, 40)


def test_same_seed_builds_the_same_network():
    torch.manual_seed(3)
    a = GamaIR(tiny_config())
    torch.manual_seed(3)
    b = GamaIR(tiny_config())
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_registry_sizes_and_overrides():
    names = [spec.name for spec in list_models()]
    assert {"gama_ir_s", "gama_ir_l"} <= set(names)
    small = create_model("gama_ir_s")
    assert small.config.width == 42 and small.config.depth == 18
    assert create_model("gama_ir_l").config.depth == 19
    grey = create_model("gama_ir_s", in_channels=1, out_channels=1)
    assert grey.intro.in_channels == 1
    assert not small.training


def test_registry_errors_are_clear():
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("gama_ir_s", pretrained=True)


def test_config_validation_and_json_round_trip():
    config = tiny_config(3)
    assert GamaIRConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="width"):
        tiny_config(width=7)
    with pytest.raises(ValueError, match="one entry per level"):
        tiny_config(decoder_blocks=(1,))
    with pytest.raises(ValueError, match="unknown fields"):
        GamaIRConfig.from_dict({**config.to_dict(), "colour": 1})


def test_local_mode_bounds_the_receptive_field():
    model = make_tiny_model(1)
    model.set_mean_mode("local")
    radius = model.receptive_radius()
    x = torch.rand(1, 1, 4 * radius, 4 * radius, requires_grad=True)
    centre = 2 * radius
    model(x)[0, 0, centre, centre].backward()
    # Running sums leave float rounding (~1e-9) everywhere; real dependence is far above it.
    grad = x.grad[0, 0].abs()
    reach = torch.nonzero(grad > 1e-5 * grad.max())
    assert (reach - centre).abs().max() <= radius
    model.set_mean_mode("global")
    x.grad = None
    model(x)[0, 0, centre, centre].backward()
    assert x.grad[0, 0, 0, 0] != 0  # global means reach the far corner

"""Tests of the five methods' networks: shapes, layer plans, switches and weight handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from anomaly.config import Config, from_dict
from anomaly.models import (
    GanomalyDiscriminator,
    GanomalyGenerator,
    SkipGanomalyDiscriminator,
    UNetGenerator,
    build_models,
    init_weights,
)

METHODS = (1, 2, 3, 4, 5)
SIZES = (32, 64, 128, 256)


def make_config(method: int, image_size: int = 32, base_channels: int = 8, **model: object) -> Config:
    model = {"method": method, "image_size": image_size, "base_channels": base_channels, **model}
    return from_dict({"model": model})


def images(batch: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator) * 2 - 1


def convs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_output_shapes(method: int, size: int) -> None:
    torch.manual_seed(0)
    config = make_config(method, size)
    generator, discriminator = build_models(config)
    x = images(2, size)

    for mode in ("train", "eval"):
        generator.train(mode == "train")
        discriminator.train(mode == "train")
        out = generator(x)
        d_out = discriminator(x)

        assert out.x_hat.shape == x.shape
        assert torch.isfinite(out.x_hat).all()
        assert out.x_hat.abs().max() <= 1.0
        if method <= 3:
            assert out.z.shape == (2, config.model.latent_dim)
            assert out.z_hat.shape == (2, config.model.latent_dim)
            assert torch.isfinite(out.z).all()
            assert torch.isfinite(out.z_hat).all()
            assert d_out.features.shape == (2, config.model.base_channels * size // 8, 4, 4)
        else:
            assert out.z is None
            assert out.z_hat is None
            assert d_out.features.shape == (2, config.model.latent_dim, 1, 1)
        assert d_out.logits.shape == (2,)
        assert torch.isfinite(d_out.logits).all()
        assert torch.isfinite(d_out.features).all()


@pytest.mark.parametrize("size", (16, 32))
@pytest.mark.parametrize("channels", (1, 3))
def test_channels_and_smallest_size(size: int, channels: int) -> None:
    for method in METHODS:
        generator, discriminator = build_models(make_config(method, size, channels=channels))
        x = images(3, size, channels)
        assert generator(x).x_hat.shape == (3, channels, size, size)
        assert discriminator(x).logits.shape == (3,)


def test_wrong_input_shape_names_expected_shape() -> None:
    generator, discriminator = build_models(make_config(1, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        generator(images(1, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        discriminator(images(1, 32, channels=1))
    unet, _ = build_models(make_config(4, 32))
    with pytest.raises(ValueError, match="model.image_size"):
        unet(images(1, 16))


@pytest.mark.parametrize("size", (24, 8, 100))
def test_invalid_image_size_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        GanomalyGenerator(size, 3, 16, 8)
    with pytest.raises(ValueError, match="power of two"):
        UNetGenerator(size, 3, 8)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method: int) -> None:
    torch.manual_seed(1)
    config = make_config(method, 32)
    generator, discriminator = build_models(config)
    x = images(4, 32)
    # Training-mode passes move the BatchNorm statistics and spectral-norm vectors off their initial values.
    generator(x)
    discriminator(x)
    discriminator(generator(x).x_hat)
    generator.eval()
    discriminator.eval()

    torch.manual_seed(2)
    fresh_generator, fresh_discriminator = build_models(config)
    fresh_generator.load_state_dict(generator.state_dict(), strict=True)
    fresh_discriminator.load_state_dict(discriminator.state_dict(), strict=True)
    fresh_generator.eval()
    fresh_discriminator.eval()

    expected, actual = generator(x), fresh_generator(x)
    assert torch.equal(expected.x_hat, actual.x_hat)
    if method <= 3:
        assert torch.equal(expected.z, actual.z)
        assert torch.equal(expected.z_hat, actual.z_hat)
    assert torch.equal(discriminator(x).logits, fresh_discriminator(x).logits)
    assert torch.equal(discriminator(x).features, fresh_discriminator(x).features)


def test_kernel_size_changes_only_kernels() -> None:
    four = make_config(2, 64, kernel_size=4)
    five = make_config(2, 64, kernel_size=5)
    assert four.model.latent_dim == five.model.latent_dim == 512

    for network in (0, 1):
        net4, net5 = build_models(four)[network], build_models(five)[network]
        modules4, modules5 = dict(net4.named_modules()), dict(net5.named_modules())
        assert list(modules4) == list(modules5)
        for name, module4 in modules4.items():
            module5 = modules5[name]
            assert type(module4) is type(module5), name
            if not isinstance(module4, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            assert module4.in_channels == module5.in_channels, name
            assert module4.out_channels == module5.out_channels, name
            assert module4.stride == module5.stride, name
            assert (module4.bias is None) == (module5.bias is None), name
            assert module4.kernel_size == (4, 4), name
            if module4.stride == (2, 2):
                assert module5.kernel_size == (5, 5), name
                assert module5.padding == (2, 2), name
                if isinstance(module5, nn.ConvTranspose2d):
                    assert module5.output_padding == (1, 1), name
            else:
                # The 4x4 <-> 1x1 convolutions keep their 4x4 kernels.
                assert module5.kernel_size == (4, 4), name
                assert module5.padding == module4.padding, name

    x = images(2, 64)
    for config in (four, five):
        generator, discriminator = build_models(config)
        assert generator(x).x_hat.shape == x.shape
        assert discriminator(x).features.shape == (2, 64, 4, 4)


def test_kernel_size_five_in_unet() -> None:
    generator, _ = build_models(make_config(4, 32, kernel_size=5))
    strided = [m for _, m in convs(generator) if m.stride == (2, 2)]
    assert len(strided) == 2 * 5
    assert all(m.kernel_size == (5, 5) for m in strided)
    assert generator(images(2, 32)).x_hat.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("latent_dim", (16, 512))
def test_latent_dim_sets_code_size(latent_dim: int) -> None:
    generator, discriminator = build_models(make_config(2, 32, latent_dim=latent_dim))
    out = generator(images(2, 32))
    assert out.z.shape == (2, latent_dim)
    assert out.z_hat.shape == (2, latent_dim)
    # The GANomaly discriminator ends in one channel whatever the latent size.
    assert discriminator(images(2, 32)).features.shape == (2, 32, 4, 4)

    _, skip_discriminator = build_models(make_config(4, 32, latent_dim=latent_dim))
    assert skip_discriminator(images(2, 32)).features.shape == (2, latent_dim, 1, 1)


def _largest_singular_value(module: nn.Module) -> float:
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        weight = weight.transpose(0, 1)
    return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2).item()


@pytest.mark.parametrize("method", (3, 4))
def test_spectral_norm_on_every_discriminator_conv(method: int) -> None:
    torch.manual_seed(3)
    config = make_config(method, 64, spectral_norm=True)
    generator, discriminator = build_models(config)

    discriminator_convs = convs(discriminator)
    # 64 px: four stride-2 convs and the 4x4 one, plus Skip-GANomaly's 3x3 classifier.
    expected_convs = 5 if method == 3 else 6
    assert len(discriminator_convs) == expected_convs
    for name, conv in discriminator_convs:
        assert parametrize.is_parametrized(conv, "weight"), name
        kinds = [type(p).__name__ for p in conv.parametrizations.weight]
        assert kinds == ["_SpectralNorm"], name
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in discriminator.modules())
    assert not any(parametrize.is_parametrized(m) for m in generator.modules())

    # Each training-mode forward runs one power iteration. The top singular values of these
    # random weights lie close together, so the estimate needs a few iterations to settle.
    discriminator.train()
    with torch.no_grad():
        for _ in range(10):
            discriminator(images(2, 64))
    discriminator.eval()
    for name, conv in discriminator_convs:
        assert _largest_singular_value(conv) == pytest.approx(1.0, abs=0.05), name


def test_method_two_discriminator_keeps_batch_norm() -> None:
    _, discriminator = build_models(make_config(2, 64))
    assert not any(parametrize.is_parametrized(m) for m in discriminator.modules())
    # 64 px: BatchNorm after the three stride-2 convolutions that follow the first.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules()) == 3


def test_reinit_keeps_parameters_and_spectral_norm() -> None:
    torch.manual_seed(4)
    _, discriminator = build_models(make_config(3, 64))
    params_before = [id(p) for p in discriminator.parameters()]
    with torch.no_grad():
        for p in discriminator.parameters():
            p.mul_(7.0)

    discriminator.apply(init_weights)

    assert [id(p) for p in discriminator.parameters()] == params_before
    discriminator.eval()
    for name, conv in convs(discriminator):
        original = conv.parametrizations.weight.original
        assert original.std().item() == pytest.approx(0.02, rel=0.5), name
        assert _largest_singular_value(conv) == pytest.approx(1.0, abs=0.05), name


def test_init_weights_distributions() -> None:
    torch.manual_seed(5)
    generator, discriminator = build_models(make_config(1, 64, base_channels=64))
    weights = torch.cat([m.weight.flatten() for _, m in convs(generator)])
    assert weights.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    for _, conv in convs(generator) + convs(discriminator):
        if conv.bias is not None:
            assert torch.count_nonzero(conv.bias) == 0
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    gains = torch.cat([m.weight for m in norms])
    assert gains.mean().item() == pytest.approx(1.0, abs=0.005)
    assert gains.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.count_nonzero(m.bias) == 0 for m in norms)


def test_unet_channel_plan() -> None:
    # The plan of the specification: 64, 128, 256, 512, then 512 for every further level.
    plans = {
        16: [64, 128, 256, 512],
        32: [64, 128, 256, 512, 512],
        256: [64, 128, 256, 512, 512, 512, 512, 512],
    }
    for size, widths in plans.items():
        generator = UNetGenerator(size, 3, 64)
        levels = len(widths)
        assert levels == int(math.log2(size))
        assert len(generator.down) == len(generator.up) == levels

        down_convs = [m for m in generator.down.modules() if isinstance(m, nn.Conv2d)]
        assert [(m.in_channels, m.out_channels) for m in down_convs] == list(zip([3] + widths[:-1], widths))
        for conv in down_convs:
            assert conv.kernel_size == (4, 4)
            assert conv.stride == (2, 2)
            assert conv.padding == (1, 1)

        up_convs = [m for m in generator.up.modules() if isinstance(m, nn.ConvTranspose2d)]
        expected_up = [(2 * widths[0], 3)]
        expected_up += [(2 * widths[i], widths[i - 1]) for i in range(1, levels - 1)]
        expected_up += [(widths[-1], widths[-2])]
        assert [(m.in_channels, m.out_channels) for m in up_convs] == expected_up

        for level, block in enumerate(generator.down):
            kinds = [type(m) for m in block]
            expected = [nn.Conv2d] if level == 0 else [nn.LeakyReLU, nn.Conv2d]
            if 0 < level < levels - 1:
                expected.append(nn.BatchNorm2d)
            assert kinds == expected, (size, level)
        for level, block in enumerate(generator.up):
            kinds = [type(m) for m in block]
            last = nn.Tanh if level == 0 else nn.BatchNorm2d
            assert kinds == [nn.ReLU, nn.ConvTranspose2d, last], (size, level)


def test_unet_skip_connections_carry_input() -> None:
    torch.manual_seed(6)
    generator = UNetGenerator(32, 3, 8).eval()
    x = images(2, 32)
    captured: dict[int, torch.Tensor] = {}
    # Up level 1's output is concatenated with down level 1's input (the output of down level 0).
    hook_down = generator.down[0].register_forward_hook(lambda m, i, o: captured.__setitem__(0, o.clone()))
    hook_up = generator.up[0].register_forward_pre_hook(lambda m, i: captured.__setitem__(1, i[0].clone()))
    generator(x)
    hook_down.remove()
    hook_up.remove()
    assert captured[1].shape == (2, 16, 16, 16)
    assert torch.equal(captured[1][:, :8], captured[0])


def _conv_count(in_channels: int, out_channels: int, kernel: int, bias: bool) -> int:
    return in_channels * out_channels * kernel * kernel + (out_channels if bias else 0)


def test_ganomaly_parameter_count_matches_layer_plan() -> None:
    # 64 px, 3 channels, base 64, latent 100. Encoder: 64 -> 32 (64 ch, no norm), then 16, 8, 4
    # (128, 256, 512 ch, each with BatchNorm), then a 4x4 conv to 1x1. BatchNorm has a weight
    # and a bias per channel; a conv has a bias only where no BatchNorm follows.
    widths = [64, 128, 256, 512]
    latent = 100

    def encoder(out_channels: int) -> int:
        total = _conv_count(3, widths[0], 4, bias=True)
        for cin, cout in zip(widths[:-1], widths[1:]):
            total += _conv_count(cin, cout, 4, bias=False) + 2 * cout
        return total + _conv_count(widths[-1], out_channels, 4, bias=True)

    decoder = _conv_count(latent, widths[-1], 4, bias=False) + 2 * widths[-1]
    for cin, cout in zip(widths[::-1][:-1], widths[::-1][1:]):
        decoder += _conv_count(cin, cout, 4, bias=False) + 2 * cout
    decoder += _conv_count(widths[0], 3, 4, bias=True)

    generator, discriminator = build_models(make_config(1, 64, base_channels=64, latent_dim=latent))
    assert sum(p.numel() for p in generator.parameters()) == 2 * encoder(latent) + decoder
    assert sum(p.numel() for p in discriminator.parameters()) == encoder(1)


def test_build_models_picks_architecture() -> None:
    for method in (1, 2, 3):
        generator, discriminator = build_models(make_config(method, 32))
        assert isinstance(generator, GanomalyGenerator)
        assert isinstance(discriminator, GanomalyDiscriminator)
    for method in (4, 5):
        generator, discriminator = build_models(make_config(method, 32))
        assert isinstance(generator, UNetGenerator)
        assert isinstance(discriminator, SkipGanomalyDiscriminator)

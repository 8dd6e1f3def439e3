"""Views: shapes, ranges, determinism, and each op against a direct computation."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.data import views as V

MEAN = torch.tensor(V.CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(V.CLIP_STD).view(1, 3, 1, 1)


def _images(b=3, h=40, w=52, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 255).to(torch.uint8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _unnormalize(x):
    return x * STD + MEAN


@pytest.mark.parametrize("view", ["weak", "strong", "eval"])
def test_shapes_dtypes_ranges(view):
    x = _images()
    for inp in (x, x.float() / 255):
        if view == "weak":
            out = V.weak_view(inp, 24, _gen(0))
        elif view == "strong":
            out = V.strong_view(inp, 24, _gen(0))
        else:
            out = V.eval_view(inp, 24)
        assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
        raw = _unnormalize(out)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_seeded_views_are_deterministic_and_differ_across_seeds():
    x = _images()
    for fn in (V.weak_view, V.strong_view):
        a, b, c = fn(x, 24, _gen(1)), fn(x, 24, _gen(1)), fn(x, 24, _gen(2))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    assert torch.equal(V.eval_view(x, 24), V.eval_view(x, 24))


def test_strong_differs_from_weak_and_the_two_strong_views_differ():
    x = _images(b=8)
    weak = V.weak_view(x, 24, _gen(0))
    strong = V.strong_view(x, 24, _gen(0))
    assert (weak - strong).abs().mean() > 0.1
    a, b = V.strong_views_one(x[0].permute(1, 2, 0).numpy(), 24, _gen(0))
    assert not torch.allclose(a, b)


def test_full_box_crop_is_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    assert torch.allclose(V.crop_resize(x, boxes, 16), x, atol=1e-6)
    flipped = V.crop_resize(x, boxes, 16, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-6)
    assert torch.allclose(flipped[1], x[1], atol=1e-6)
    # A box picks exactly the pixels it covers when no resampling is needed.
    box = torch.tensor([[3.0, 5.0, 8.0, 8.0]] * 2)
    assert torch.allclose(V.crop_resize(x, box, 8), x[:, :, 5:13, 3:11], atol=1e-6)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    n, h, w = 4000, 60, 80
    boxes = V.random_resized_crop_boxes(n, h, w, (0.08, 1.0), generator=_gen(0))
    x0, y0, bw, bh = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + bw <= w).all() and (y0 + bh <= h).all()
    area = bw * bh / (h * w)
    assert area.min() > 0.06 and area.max() <= 1.0  # rounding widens 0.08 a little
    ratio = bw / bh
    assert ratio.min() > 0.7 and ratio.max() < 1.42
    weak = V.random_resized_crop_boxes(n, h, w, (0.5, 1.0), generator=_gen(0))
    assert (weak[:, 2] * weak[:, 3] / (h * w)).min() > 0.45


def test_crop_fallback_is_the_centred_clamped_box():
    # A 10x100 strip: no 3/4-4/3 box of area >= half fits, so the fallback (full height, w = h*4/3).
    boxes = V.random_resized_crop_boxes(5, 10, 100, (0.5, 1.0), generator=_gen(0))
    assert torch.allclose(boxes, torch.tensor([[(100 - 13) / 2, 0.0, 13.0, 10.0]] * 5))


def test_color_jitter_identity_and_hue_against_colorsys():
    x = torch.rand(2, 3, 5, 7)
    one, zero = torch.ones(2), torch.zeros(2)
    assert torch.allclose(V.color_jitter(x, one, one, one, zero), x, atol=1e-6)
    hue = torch.tensor([0.1, -0.07])
    y = V.color_jitter(x, one, one, one, hue)
    for b in range(2):
        for i, j in ((0, 0), (3, 6), (2, 4)):
            h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
            expected = colorsys.hsv_to_rgb((h + hue[b].item()) % 1.0, s, v)
            assert np.allclose(y[b, :, i, j].tolist(), expected, atol=1e-5)
    # Brightness scales and clamps; contrast 0 gives the mean grey; saturation 0 gives grey.
    assert torch.allclose(V.color_jitter(x, one * 0.5, one, one, zero), x * 0.5, atol=1e-6)
    flat = V.color_jitter(x, one, zero, one, zero)
    assert torch.allclose(flat, V.grey(x).mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-6)
    desat = V.color_jitter(x, one, one, zero, zero)
    assert torch.allclose(desat, V.grey(x).expand_as(x), atol=1e-6)


def test_gaussian_blur_against_a_direct_convolution():
    x = torch.rand(2, 3, 20, 20)
    sigma = torch.tensor([0.0, 1.3])
    y = V.gaussian_blur(x, sigma)
    assert torch.allclose(y[0], x[0])
    t = torch.arange(-6, 7, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * 1.3**2))
    k2 = torch.outer(k, k) / k.sum() ** 2
    ref = F.conv2d(F.pad(x[1:], (6, 6, 6, 6), mode="reflect"), k2.expand(3, 1, 13, 13), groups=3)
    assert torch.allclose(y[1:], ref, atol=1e-5)


def test_eval_view_is_centre_crop_then_resize():
    x = torch.rand(1, 3, 30, 50)
    out = V.eval_view(x, 30)
    assert torch.allclose(_unnormalize(out), x[:, :, :, 10:40], atol=1e-5)


def test_strong_view_probabilities():
    # Grey-out (p 0.2) on a colourful image: a view is grey when its channels are equal.
    x = torch.zeros(1000, 3, 8, 8)
    x[:, 0] = 0.9
    x[:, 1] = 0.2
    out = _unnormalize(V.strong_view(x, 8, _gen(0), V.ViewRecipe(blur_sigma=(0.1, 0.1))))
    is_grey = ((out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-4).float().mean().item()
    assert 0.14 < is_grey < 0.26


def test_single_image_fast_path_matches_the_batched_view():
    # The CPU wrappers crop by slicing + interpolate; same parameters, same pixels away from the border.
    x = torch.rand(1, 3, 40, 52)
    box = torch.tensor([[7.0, 4.0, 30.0, 25.0]])
    batched = V.crop_resize(x, box, 48, flip=torch.tensor([True]))
    one = V.crop_resize_one(x[0], box[0], 48, flip=True)
    assert torch.allclose(batched[0, :, 1:-1, 1:-1], one[:, 1:-1, 1:-1], atol=1e-5)
    # Crops that upsample (here 0.5-1 of 40x52 to 48): downsampling differs by design (no antialiasing).
    weak = V.weak_view(x, 48, _gen(4), scale=(0.5, 1.0))
    weak_one = V.weak_view_one(x[0], 48, _gen(4), scale=(0.5, 1.0))
    assert torch.allclose(weak[0, :, 2:-2, 2:-2], weak_one[:, 2:-2, 2:-2], atol=1e-4)


def test_single_image_wrappers_take_numpy_hwc_and_grey():
    rgb = (np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8)
    assert V.weak_view_one(rgb, 16, _gen(0)).shape == (3, 16, 16)
    assert V.eval_view_one(rgb[..., 0], 16).shape == (3, 16, 16)
    a, b = V.strong_views_one(np.broadcast_to(rgb[..., :1], (30, 20, 3)), 16, _gen(0))
    assert a.shape == b.shape == (3, 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_cuda_match_cpu_with_a_cpu_generator():
    x = _images(b=4)
    for fn in (V.weak_view, V.strong_view):
        cpu = fn(x, 24, _gen(3))
        gpu = fn(x.cuda(), 24, _gen(3))
        assert gpu.device.type == "cuda"
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)
    assert torch.allclose(V.eval_view(x, 24), V.eval_view(x.cuda(), 24).cpu(), atol=1e-4)


@pytest.mark.parametrize("p_grey", [0.0, 1.0])
def test_every_strong_view_path_reads_the_recipe(p_grey):
    """The batched view, the CPU workers' one-image view and the torch backend's canvas views all take
    their parameters from one ViewRecipe: greyscale never or always, on colourful images."""
    from unimlip_fast.data.torch_loader import canvas, make_views

    recipe = V.ViewRecipe(p_jitter=0.0, p_grey=p_grey)
    x = torch.rand(4, 3, 20, 20, generator=_gen(1))
    hs = ws = torch.full((4,), 20.0)
    views = [
        V.strong_view(x, 12, _gen(0), recipe),
        torch.stack(V.strong_views_one(x[0].permute(1, 2, 0).numpy(), 12, _gen(0), recipe)),
        make_views(canvas(list(x))[0], hs, ws, 12, _gen(0), True, recipe)["image_a"],
    ]
    for view in views:
        spread = (_unnormalize(view).amax(1) - _unnormalize(view).amin(1)).flatten(1).amax(1)
        assert bool((spread < 1e-4).all()) == (p_grey == 1.0) and bool((spread > 1e-2).all()) == (p_grey == 0.0)

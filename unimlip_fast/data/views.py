"""Image views as batched tensor ops: the same code on CPU loader workers and on CUDA batches.

Every view takes ``images [B,3,H,W]`` (uint8, or float in [0,1]) and returns a normalised float
batch ``[B,3,size,size]``. Random parameters are drawn per sample from the ``torch.Generator`` passed
in (on any device; the few parameter tensors are moved to the images' device), so a seeded
generator gives the same views on every device. Their parameters are one :class:`ViewRecipe`
(:data:`VIEW_RECIPE` by default), which every backend (the torch and DALI ones too) reads:

- weak view (ITC, MLM): random resized crop of area ``weak_scale`` (PMC-CLIP's 0.9-1), aspect ``ratio``.
- strong view (SimCLR): random resized crop of area ``strong_scale`` (near the whole image, as the
  paper keeps small findings; SLIP's is 0.08-1); colour jitter (brightness, contrast, saturation,
  hue) with probability ``p_jitter`` (fixed order); greyscale, ``p_grey``; Gaussian blur of sigma
  ``blur_sigma`` px, ``p_blur``; horizontal flip, ``p_flip``.
- eval view: resize the short side to ``size``, centre crop.

Batched, crop, resize and flip are one ``affine_grid``/``grid_sample`` (bilinear, no antialiasing:
a crop much larger than ``size`` aliases; the CPU loader decodes to about 1.15x ``size`` first). The
single-image wrappers that the CPU loader's workers call draw the same parameters but crop by
slicing and resize with antialiasing, which is faster on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RATIO = (3 / 4, 4 / 3)
_GREY = (0.299, 0.587, 0.114)
_DATA_DEFAULTS = DataConfig()  # the crop areas' defaults are the config's (data.weak_scale, data.strong_scale)


@dataclass(frozen=True)
class ViewRecipe:
    """The random parameters of the weak and strong views (SLIP's strong view, with the crop near
    the whole image), written once: :mod:`.views`, the torch backend and DALI derive theirs from it."""

    weak_scale: tuple[float, float] = tuple(_DATA_DEFAULTS.weak_scale)  # crop area of the weak view
    strong_scale: tuple[float, float] = tuple(_DATA_DEFAULTS.strong_scale)  # crop area of the strong views
    ratio: tuple[float, float] = RATIO  # crop aspect range
    # Colour jitter: brightness, contrast, saturation factors in 1 +- x, hue shift in +- x of the circle.
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    p_jitter: float = 0.8
    p_grey: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px, uniform
    p_blur: float = 0.5
    p_flip: float = 0.5  # horizontal

    def __post_init__(self):
        for name in ("weak_scale", "strong_scale", "ratio", "jitter", "blur_sigma"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def with_scales(self, weak_scale, strong_scale) -> ViewRecipe:
        """This recipe with the crop areas of a run's config (``data.weak_scale``, ``data.strong_scale``)."""
        return dataclasses.replace(self, weak_scale=tuple(weak_scale), strong_scale=tuple(strong_scale))


VIEW_RECIPE = ViewRecipe()


# ------------------------------------------------------------------------------------------ helpers


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0,1]; floating input is returned as it is."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images


def to_chw(image) -> torch.Tensor:
    """One image (``HxWx3`` or ``HxW`` numpy uint8, or a ``[3,H,W]`` tensor) -> float ``[3,H,W]`` in [0,1]."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        t = torch.tensor(image).permute(2, 0, 1)  # a copy: decoded and cached arrays are read-only
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return to_float(t)
    return to_float(image)


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def _uniform(n: int, lo: float, hi: float, generator, device, shape=()) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    u = torch.rand((n, *shape), generator=generator, device=gdev)
    return (lo + (hi - lo) * u).to(device)


def _bernoulli(n: int, p: float, generator, device) -> torch.Tensor:
    return _uniform(n, 0.0, 1.0, generator, device) < p


def grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, ``[B,1,H,W]`` (as torchvision's rgb_to_grayscale)."""
    r, g, b = images.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


# --------------------------------------------------------------------------------- crop and resize


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale, ratio=RATIO, generator=None, device=None):
    """torchvision's RandomResizedCrop parameters for images of sizes ``heights`` x ``widths``
    ([n] tensors), vectorised: ten tries per sample, the first that fits, else the whole image
    clamped to the aspect range, centred. ``[n,4]`` float32 ``(x0, y0, w, h)`` in each image's
    pixels, on ``device`` (default: the sizes'); sub-pixel boxes are fine for grid_sample."""
    device = heights.device if device is None else torch.device(device)
    n, tries = len(heights), 10
    hh, ww = heights.to(device, torch.float64), widths.to(device, torch.float64)
    area = (hh * ww)[:, None] * _uniform(n, scale[0], scale[1], generator, device, (tries,)).double()
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, device, (tries,)).double())
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = ok.double().argmax(dim=1, keepdim=True)  # first fitting try (0 when none fit)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Fallback when no try fits: the whole image clamped to the aspect range, centred.
    in_ratio = ww / hh
    fw = torch.where(in_ratio > ratio[1], (hh * ratio[1]).round(), ww)
    fh = torch.where(in_ratio < ratio[0], (ww / ratio[0]).round(), hh)
    any_ok = ok.any(dim=1)
    w, h = torch.where(any_ok, w, fw), torch.where(any_ok, h, fh)
    ux = _uniform(n, 0.0, 1.0, generator, device).double()
    uy = _uniform(n, 0.0, 1.0, generator, device).double()
    # torchvision draws integer offsets in [0, W - w]; a continuous offset is the same distribution's hull.
    x0 = torch.where(any_ok, torch.minimum(torch.floor(ux * (ww - w + 1)), ww - w), (ww - w) / 2)
    y0 = torch.where(any_ok, torch.minimum(torch.floor(uy * (hh - h + 1)), hh - h), (hh - h) / 2)
    return torch.stack([x0, y0, w, h], dim=1).float()


def random_resized_crop_boxes(n, height, width, scale, ratio=RATIO, generator=None, device="cpu"):
    """:func:`crop_boxes` for ``n`` images of one size ``height`` x ``width``."""
    sizes = torch.ones(n, dtype=torch.float64, device=device)
    return crop_boxes(sizes * height, sizes * width, scale, ratio, generator)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes [B,4] (x0,y0,w,h)`` out of ``images [B,3,H,W]`` (float), resize to ``size``
    and mirror where ``flip [B]`` is set: one batched affine_grid + grid_sample."""
    b, _, height, width = images.shape
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    x0, y0, w, h = boxes.unbind(1)
    sx = w / width
    if flip is not None:
        sx = torch.where(flip.to(images.device), -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [
            torch.stack([sx, zero, (2 * x0 + w) / width - 1], dim=1),
            torch.stack([zero, h / height, (2 * y0 + h) / height - 1], dim=1),
        ],
        dim=1,
    )  # [B,2,3]: output coords in [-1,1] -> input coords in [-1,1] (align_corners=False)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------- colour and blur


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    maxc, _ = img.max(dim=1)
    minc, _ = img.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """Closed form: channel ``c_n = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``,
    n = 5, 3, 1 for r, g, b (the same values as torchvision's sector table, fewer temporaries)."""
    h, s, v = img[:, :1], img[:, 1:2], img[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h * 6.0, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def color_jitter(images, brightness, contrast, saturation, hue) -> torch.Tensor:
    """Per-sample factors ``[B]`` (1, 1, 1, 0 = unchanged), applied in torchvision's order
    brightness, contrast, saturation, hue, clamped to [0,1] after each."""
    v = lambda t: t.to(images.device, images.dtype).view(-1, 1, 1, 1)
    x = (images * v(brightness)).clamp(0, 1)
    c = v(contrast)
    x = (c * x + (1 - c) * grey(x).mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    s = v(saturation)
    x = (s * x + (1 - s) * grey(x)).clamp(0, 1)
    hue = hue.to(images.device)
    if images.device.type != "cpu":  # compute for all rather than sync with the host
        return torch.where(v(hue) != 0, _shift_hue(x, hue), x)
    # On CPU, only the samples that shift hue and have colour (hue is a no-op on grey images).
    todo = torch.nonzero((hue != 0) & (x.amax(1) > x.amin(1)).flatten(1).any(1)).squeeze(1)
    if len(todo):
        x[todo] = _shift_hue(x[todo], hue[todo])
    return x


def _shift_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, :1] + hue.to(x.dtype).view(-1, 1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float = 2.0) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma [B]`` in pixels (0 = unchanged), reflect
    padding; one grouped convolution per axis for the whole batch."""
    b, c, height, width = images.shape
    radius = max(1, min(math.ceil(3 * max_sigma), (min(height, width) - 1)))
    t = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sig = sigma.to(images.device, images.dtype).view(-1, 1)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sig.clamp(min=1e-6) ** 2))
    k = torch.where(sig > 0, k, (t == 0).to(images.dtype).view(1, -1))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, K]
    x = images.reshape(1, b * c, height, width)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    return x.view(b, c, height, width)


# ------------------------------------------------------------------------------------------- views


def weak_view(images, size: int, generator=None, scale=VIEW_RECIPE.weak_scale, ratio=RATIO) -> torch.Tensor:
    """Random resized crop (``scale``, ``ratio``) to ``size``, then CLIP normalisation."""
    x = to_float(images)
    boxes = random_resized_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator, x.device)
    return normalize(crop_resize(x, boxes, size))


def strong_view(images, size: int, generator=None, recipe: ViewRecipe = VIEW_RECIPE) -> torch.Tensor:
    """The SimCLR view of ``recipe``: crop of area ``strong_scale``, colour jitter, greyscale, blur,
    horizontal flip, CLIP normalisation. The flip is folded into the crop's grid, which is exact
    because colour ops are per pixel and the blur kernel is symmetric."""
    x = to_float(images)
    n, dev = x.shape[0], x.device
    boxes = random_resized_crop_boxes(n, x.shape[2], x.shape[3], recipe.strong_scale, recipe.ratio, generator, dev)
    flip = _bernoulli(n, recipe.p_flip, generator, dev)
    x = crop_resize(x, boxes, size, flip)
    return normalize(strong_photometric(x, generator, recipe))


def strong_photometric(x: torch.Tensor, generator=None, recipe: ViewRecipe = VIEW_RECIPE) -> torch.Tensor:
    """The strong view after the crop: colour jitter, greyscale, blur on float ``[B,3,S,S]`` in
    [0,1], not normalised."""
    n, dev = x.shape[0], x.device
    bj, cj, sj, hj = recipe.jitter
    on = _bernoulli(n, recipe.p_jitter, generator, dev)
    one = torch.ones(n, device=dev)
    bright = torch.where(on, _uniform(n, max(0.0, 1 - bj), 1 + bj, generator, dev), one)
    contr = torch.where(on, _uniform(n, max(0.0, 1 - cj), 1 + cj, generator, dev), one)
    sat = torch.where(on, _uniform(n, max(0.0, 1 - sj), 1 + sj, generator, dev), one)
    hue = torch.where(on, _uniform(n, -hj, hj, generator, dev), torch.zeros(n, device=dev))
    x = color_jitter(x, bright, contr, sat, hue)

    to_grey = _bernoulli(n, recipe.p_grey, generator, dev).view(-1, 1, 1, 1)
    x = torch.where(to_grey, grey(x).expand_as(x), x)

    blur = _bernoulli(n, recipe.p_blur, generator, dev)
    lo, hi = recipe.blur_sigma
    sigma = torch.where(blur, _uniform(n, lo, hi, generator, dev), torch.zeros(n, device=dev))
    return gaussian_blur(x, sigma, max_sigma=hi)


def eval_view(images, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` and centre crop (crop the centred square first, then one
    antialiased bilinear resize), CLIP normalisation. Deterministic."""
    x = to_float(images)
    height, width = x.shape[2], x.shape[3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = x[:, :, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x.clamp(0, 1))


# ------------------------------------------------------------------------- one image (CPU workers)


def crop_resize_one(image: torch.Tensor, box, size: int, flip: bool = False) -> torch.Tensor:
    """CPU fast path for one float ``[3,H,W]`` image and an integer box: slice, then one antialiased
    bilinear resize (about 2.5x faster than grid_sample on CPU; samples stay inside the box)."""
    x0, y0, w, h = (int(round(float(v))) for v in box)
    crop = image[None, :, y0 : y0 + h, x0 : x0 + w]
    if (h, w) != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (crop.flip(-1) if flip else crop)[0].clamp(0, 1)


def weak_view_one(image, size: int, generator=None, scale=VIEW_RECIPE.weak_scale, ratio=RATIO) -> torch.Tensor:
    """One image (HxWx3 or HxW uint8 numpy, or [3,H,W] tensor) -> ``[3,size,size]``; the same
    parameters as :func:`weak_view` draws, cropped with :func:`crop_resize_one`."""
    x = to_chw(image)
    (box,) = random_resized_crop_boxes(1, x.shape[1], x.shape[2], scale, ratio, generator, x.device)
    return normalize(crop_resize_one(x, box, size)[None])[0]


def strong_views_one(
    image, size: int, generator=None, recipe: ViewRecipe = VIEW_RECIPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent strong views of one image: crops one at a time, the rest as a batch of two."""
    x = to_chw(image)
    boxes = random_resized_crop_boxes(2, x.shape[1], x.shape[2], recipe.strong_scale, recipe.ratio, generator, x.device)
    flip = _bernoulli(2, recipe.p_flip, generator, x.device)
    crops = torch.stack([crop_resize_one(x, boxes[k], size, bool(flip[k])) for k in range(2)])
    a, b = normalize(strong_photometric(crops, generator, recipe))
    return a, b


def eval_view_one(image, size: int) -> torch.Tensor:
    return eval_view(to_chw(image).unsqueeze(0), size)[0]

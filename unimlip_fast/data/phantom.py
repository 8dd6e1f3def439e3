"""A built-in synthetic "phantom" data set: generated images whose captions say what is in them.

Five factors, each drawn uniformly and each made plainly visible so that a short CPU run learns
them and retrieval shows it:

- modality: ``CT`` (black background, sharp edges, fine grain, bright skull, ring-enhancing
  lesions), ``MRI`` (smooth tissue under a slow bias field, bright fat rim, dark bone), ``X-ray``
  (grey background, softened projection look, rib stripes and a spine band);
- region: ``head`` (tall ellipse with a skull ring), ``chest`` (wide ellipse, two dark lungs, spine),
  ``abdomen`` (rounded box with a liver and a spine);
- lesion count (one to three), size (small / large), and position (upper / lower, left / right: the
  quadrant of the image all lesions lie in).

Captions come from three templates, e.g. "MRI of the head showing two small lesions in the upper
left." Record ``i`` of seed ``s`` depends only on ``(s, i)``, never on ``n``; no files are read.
"""

from __future__ import annotations

import numpy as np

from .records import ItemSet, Record, Skips, canonical_split

MODALITIES = ("CT", "MRI", "X-ray")
REGIONS = ("head", "chest", "abdomen")
COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
VERTICAL = ("upper", "lower")
HORIZONTAL = ("left", "right")
TEMPLATES = (
    "{mod} of the {region} showing {count} {size} {lesions} in the {vert} {horiz}.",
    "{Region} {mod}: {count} {size} {lesions}, {vert} {horiz}.",
    "{Count} {size} {lesions} in the {vert} {horiz} on {mod} of the {region}.",
)
SPLIT_SEEDS = {"train": 0, "dev": 1, "test": 2}
EVAL_SIZE = 512  # pairs in the phantom dev and test splits (at most phantom_size)


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur (applied twice, near-Gaussian) with edge padding."""
    k = 2 * radius + 1
    for _ in range(2):
        for axis in (0, 1):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (radius + 1, radius)
            c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis)
            img = ((c[k:] - c[:-k]) if axis == 0 else (c[:, k:] - c[:, :-k])) / k
    return img


def _lesion_centres(rng, count: int, r: float, vert: int, horiz: int) -> list[tuple[float, float]]:
    """``count`` centres in one quadrant, at least ``2r`` plus a gap apart when they fit."""
    sx = -1.0 if horiz == 0 else 1.0  # image left = negative x
    sy = -1.0 if vert == 0 else 1.0  # upper = negative y (row 0 at the top)
    best: list = []
    for _attempt in range(200):
        pts = [(sx * rng.uniform(0.12, 0.66 - r), sy * rng.uniform(0.12, 0.6 - r)) for _ in range(count)]
        gap = min(
            (np.hypot(a[0] - b[0], a[1] - b[1]) for i, a in enumerate(pts) for b in pts[i + 1 :]),
            default=np.inf,
        )
        if gap >= 2 * r + 0.025:
            return pts
        if not best or gap > best[0][0]:
            best = [(gap, pts)]  # the most spread-out layout, if none fits
    return best[0][1]


def render(factors: dict[str, int], rng, px: int = 128) -> np.ndarray:
    """One phantom image, ``[px, px]`` uint8. ``factors``: modality, region, count, size, vert and
    horiz, each an index into the tuples above."""
    modality, region, count, size, vert, horiz = (
        factors[k] for k in ("modality", "region", "count", "size", "vert", "horiz")
    )
    ax = ((np.arange(px) + 0.5) / px * 2 - 1).astype(np.float32)  # float32 throughout
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    s = float(rng.uniform(0.94, 1.04))
    cx, cy = (float(v) for v in rng.uniform(-0.03, 0.03, size=2))
    mod = MODALITIES[modality]

    # Levels per modality: background, tissue, bone, air (lungs), fat rim, organ, lesion.
    lv = {
        "CT": dict(bg=0.0, tissue=0.42, bone=0.97, air=0.06, rim=0.42, organ=0.55, lesion=0.92),
        "MRI": dict(bg=0.04, tissue=0.5, bone=0.12, air=0.08, rim=0.9, organ=0.32, lesion=1.0),
        "X-ray": dict(bg=0.2, tissue=0.6, bone=0.9, air=0.16, rim=0.6, organ=0.7, lesion=1.0),
    }[mod]
    img = np.full((px, px), lv["bg"], dtype=np.float32)
    name = REGIONS[region]
    if name == "head":
        outer = _ellipse(xx, yy, cx, cy, 0.78 * s, 0.88 * s)
        inner = _ellipse(xx, yy, cx, cy, 0.7 * s, 0.8 * s)
        img[outer] = lv["rim"] if mod == "MRI" else lv["bone"]
        skull = _ellipse(xx, yy, cx, cy, 0.74 * s, 0.84 * s)
        img[skull] = lv["bone"]
        img[inner] = lv["tissue"]
        img[_ellipse(xx, yy, cx, cy + 0.02, 0.07, 0.22)] = lv["air"]  # ventricles
    elif name == "chest":
        outer = _ellipse(xx, yy, cx, cy, 0.9 * s, 0.72 * s)
        inner = _ellipse(xx, yy, cx, cy, 0.83 * s, 0.65 * s)
        img[outer] = lv["rim"]
        img[inner] = lv["tissue"]
        for side in (-1, 1):
            img[_ellipse(xx, yy, cx + side * 0.4 * s, cy - 0.02, 0.3 * s, 0.5 * s)] = lv["air"]
        if mod == "X-ray":  # ribs as faint stripes across the lungs, the spine as a band
            img[(np.abs(np.sin((yy - cy) * 16)) > 0.96) & inner] = 0.42
            img[(np.abs(xx - cx) < 0.06) & inner] = 0.8
        elif mod == "MRI":  # a dark vertebra (on CT a bright one would look like one more lesion)
            img[_ellipse(xx, yy, cx, cy + 0.5 * s, 0.09, 0.09)] = lv["bone"]
    else:  # abdomen: rounded box (superellipse)
        outer = (np.abs((xx - cx) / (0.86 * s)) ** 4 + np.abs((yy - cy) / (0.72 * s)) ** 4) <= 1
        inner = (np.abs((xx - cx) / (0.79 * s)) ** 4 + np.abs((yy - cy) / (0.65 * s)) ** 4) <= 1
        img[outer] = lv["rim"]
        img[inner] = lv["tissue"]
        img[_ellipse(xx, yy, cx - 0.35 * s, cy - 0.25 * s, 0.3 * s, 0.2 * s)] = lv["organ"]  # liver
        if mod == "X-ray":
            img[(np.abs(xx - cx) < 0.06) & inner] = 0.8  # spine
        elif mod == "MRI":
            img[_ellipse(xx, yy, cx, cy + 0.48 * s, 0.1, 0.1)] = lv["bone"]  # dark vertebra

    r = (0.06 if size == 0 else 0.125) * float(rng.uniform(0.92, 1.08))
    for lx, ly in _lesion_centres(rng, count + 1, r, vert, horiz):
        d = np.hypot(xx - np.float32(lx), yy - np.float32(ly))
        if mod == "CT":  # rim-enhancing lesion: bright ring, darker core
            img[d <= r] = lv["lesion"]
            img[d <= r * 0.55] = 0.7
        else:
            img[d <= r] = lv["lesion"]

    if mod == "CT":
        img = img + rng.normal(0, 0.045, img.shape).astype(np.float32)
    elif mod == "MRI":
        a, b = (float(v) for v in rng.uniform(0, 2 * np.pi, size=2))
        field = 1 + 0.25 * (np.cos(a) * xx + np.sin(b) * yy)
        img = _blur(img, 1) * field + np.abs(rng.normal(0, 0.02, img.shape)).astype(np.float32)
    else:
        shade = 1 - 0.2 * (yy + 1) / 2  # darker towards the bottom
        img = _blur(img, max(1, px // 100)) * shade + rng.normal(0, 0.01, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def caption_for(modality: int, region: int, count: int, size: int, vert: int, horiz: int, template: int = 0) -> str:
    fields = dict(
        mod=MODALITIES[modality],
        region=REGIONS[region],
        Region=REGIONS[region].capitalize(),
        count=COUNTS[count],
        Count=COUNTS[count].capitalize(),
        size=SIZES[size],
        lesions="lesion" if count == 0 else "lesions",
        vert=VERTICAL[vert],
        horiz=HORIZONTAL[horiz],
    )
    return TEMPLATES[template].format(**fields)


def phantom_sample(seed: int, i: int, px: int = 128) -> tuple[np.ndarray, str, dict[str, str]]:
    """Pair ``i`` of seed ``seed``: ``(image [px,px,3] uint8, caption, factors)``."""
    rng = np.random.default_rng([seed, i])
    f = dict(
        modality=int(rng.integers(3)),
        region=int(rng.integers(3)),
        count=int(rng.integers(3)),
        size=int(rng.integers(2)),
        vert=int(rng.integers(2)),
        horiz=int(rng.integers(2)),
    )
    template = int(rng.integers(len(TEMPLATES)))
    grey = render(f, rng, px)
    image = np.broadcast_to(grey[:, :, None], (px, px, 3))  # greyscale; a view, no 3x memory
    factors = dict(
        modality=MODALITIES[f["modality"]],
        region=REGIONS[f["region"]],
        count=COUNTS[f["count"]],
        size=SIZES[f["size"]],
        position=f"{VERTICAL[f['vert']]} {HORIZONTAL[f['horiz']]}",
    )
    return image, caption_for(**f, template=template), factors


def phantom_records(n: int, seed: int = 0, px: int = 128) -> ItemSet[Record]:
    """``n`` phantom pairs, deterministic from ``seed`` (record ``i`` does not depend on ``n``)."""
    if n < 1:
        raise ValueError(f"phantom size must be at least 1, got {n}")
    records = []
    for i in range(n):
        image, caption, _ = phantom_sample(seed, i, px)
        records.append(Record(key=f"phantom-{seed}-{i:06d}", caption=caption, image=image))
    return ItemSet(records, Skips(), f"phantom(n={n}, seed={seed})")


def phantom_split(phantom_size: int, split: str | None = "train", px: int = 128) -> ItemSet[Record]:
    """The phantom split: ``train`` (and ``all``) has ``phantom_size`` pairs from seed 0; ``dev`` and
    ``test`` have ``min(phantom_size, 512)`` pairs from seeds 1 and 2 (new images, same captions)."""
    s = canonical_split(split) or "train"
    n = phantom_size if s == "train" else min(phantom_size, EVAL_SIZE)
    return phantom_records(n, SPLIT_SEEDS[s], px)

"""Nuclei images drawn apart from ``napari_binn.synthetic.render``, to check the counting on images it was not built on.

Unlike ``render_microscopy`` (soft discs at least one diameter apart): nuclei are flat-topped ellipses with soft
edges (lognormal sizes with a CV of 0.15, axes up to 25% longer or shorter than the mean radius, random
orientations, lognormal brightness), packed without overlap by random sequential addition, judged along the line
between centres, so neighbours can sit closer than one mean diameter across their short axes. The image is the
brightest nucleus at each pixel, blurred by a Gaussian PSF (sd 1.2 µm), over a flat background of photons, with
photon shot noise, a camera offset and read noise (sd 3 counts); the signal can fade over the frames (bleaching)
while the background and offset stay.

Used by ``density_bench.py`` (a uniform density per frame) and ``discovery_bench.py --images`` (the cells of a
case's noise-free field, Poisson per box).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


class _Packer:
    """Ellipses (row, col, semi-axis a, semi-axis b, angle) in pixels, added only where they overlap none."""

    def __init__(self, radius_px: float, eccentricity: float, rng: np.random.Generator) -> None:
        self.radius, self.ecc, self.rng = radius_px, eccentricity, rng
        self.cell = 3.0 * radius_px
        self.placed: list[tuple[float, float, float, float, float]] = []
        self.buckets: dict[tuple[int, int], list[int]] = {}

    def try_add(self, r: float, c: float) -> bool:
        size = self.radius * self.rng.lognormal(0.0, 0.15)
        stretch = 1.0 + self.ecc * self.rng.uniform(-1.0, 1.0)
        a, b, ang = size * stretch, size / stretch, self.rng.uniform(0.0, np.pi)
        key = (int(r // self.cell), int(c // self.cell))
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                for j in self.buckets.get((key[0] + dr, key[1] + dc), ()):
                    r2, c2, a2, b2, ang2 = self.placed[j]
                    dist = np.hypot(r2 - r, c2 - c)
                    towards = np.arctan2(c2 - c, r2 - r)
                    reach = sum(1.0 / np.hypot(np.cos(towards - t) / aa, np.sin(towards - t) / bb)
                                for aa, bb, t in ((a, b, ang), (a2, b2, ang2)))
                    if dist < reach:
                        return False
        self.buckets.setdefault(key, []).append(len(self.placed))
        self.placed.append((r, c, a, b, ang))
        return True

    def cells(self) -> np.ndarray:
        return np.array(self.placed).reshape(-1, 5)


def _draw(shape: tuple[int, int], cells: np.ndarray, brightness: np.ndarray, radius_px: float, pixel_size_um: float,
          background: float, offset: float, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros(shape)
    h = int(2 * radius_px) + 3  # each nucleus is drawn on a square of 2h + 1 pixels around its centre
    for (r, c, a, b, ang), w in zip(cells, brightness):
        r0, c0 = int(r), int(c)
        ys, xs = np.mgrid[max(0, r0 - h):min(shape[0], r0 + h + 1), max(0, c0 - h):min(shape[1], c0 + h + 1)]
        along = ((ys - r) * np.cos(ang) + (xs - c) * np.sin(ang)) / a
        across = (-(ys - r) * np.sin(ang) + (xs - c) * np.cos(ang)) / b
        edge = 1.0 / (1.0 + np.exp(6.0 * (np.hypot(along, across) - 1.0)))
        img[ys, xs] = np.maximum(img[ys, xs], w * edge)
    img = ndi.gaussian_filter(img, 1.2 / pixel_size_um) + background
    img = rng.poisson(img) + rng.normal(offset, 3.0, img.shape)
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


def uniform_frames(densities, *, diameter_um: float = 10.0, pixel_size_um: float = 1.0, side_um: float = 500.0,
                   brightness_cv: float = 0.3, photons: float = 400.0, background: float = 300.0,
                   offset: float = 100.0, fade_to: float = 1.0, eccentricity: float = 0.25, seed: int = 0):
    """One square frame per density (cells/mm², Poisson number of cells placed uniformly) -> (uint16 frames
    (T, Y, X), nucleus centres per frame in pixels)."""
    rng = np.random.default_rng(seed)
    side = int(round(side_um / pixel_size_um))
    frames, centres = [], []
    for dens, fade in zip(densities, np.linspace(1.0, fade_to, len(densities))):
        packer = _Packer(0.5 * diameter_um / pixel_size_um, eccentricity, rng)
        n = rng.poisson(dens * (side_um / 1000.0) ** 2)
        for _ in range(400 * max(n, 1)):
            if len(packer.placed) >= n:
                break
            packer.try_add(*rng.uniform(0.0, side, 2))
        cells = packer.cells()
        w = fade * photons * rng.lognormal(0.0, brightness_cv, len(cells))
        frames.append(_draw((side, side), cells, w, packer.radius, pixel_size_um, background, offset, rng))
        centres.append(cells[:, :2])
    return np.stack(frames), centres


def field_frames(u: np.ndarray, mask: np.ndarray, box_um: float, *, diameter_um: float = 10.0,
                 pixel_size_um: float = 2.0, brightness_cv: float = 0.3, photons: float = 400.0,
                 background: float = 300.0, offset: float = 100.0, fade_to: float = 1.0,
                 eccentricity: float = 0.25, seed: int = 0):
    """Frames whose cells follow a density field: per frame and box of ``mask``, a Poisson number of cells with
    mean ``u x box area`` (u in cells/mm², NaN read as 0), placed uniformly in the box where they overlap no
    earlier cell (a box whose cells do not fit in 200 tries each keeps fewer). -> (uint16 frames (T, Y, X), cells
    drawn per box (T, Ny, Nx), pixel mask (Y, X))."""
    rng = np.random.default_rng(seed)
    b = int(round(box_um / pixel_size_um))
    if b < 2 or abs(b * pixel_size_um - box_um) > 1e-6 * box_um:
        raise ValueError(f"pixel_size_um {pixel_size_um} must divide the box size {box_um}")
    T, ny, nx = u.shape
    lam = np.where(mask[None] & np.isfinite(u), np.clip(np.nan_to_num(u), 0.0, None), 0.0) * (box_um / 1000.0) ** 2
    counts = rng.poisson(lam)
    drawn = np.zeros_like(counts)
    frames = []
    for t in range(T):
        packer = _Packer(0.5 * diameter_um / pixel_size_um, eccentricity, rng)
        for i, j in zip(*np.nonzero(counts[t])):
            before = len(packer.placed)
            for _ in range(200 * counts[t, i, j]):
                if len(packer.placed) - before >= counts[t, i, j]:
                    break
                packer.try_add(b * i + rng.uniform(0.0, b), b * j + rng.uniform(0.0, b))
            drawn[t, i, j] = len(packer.placed) - before
        cells = packer.cells()
        fade = 1.0 + (fade_to - 1.0) * t / max(T - 1, 1)
        w = fade * photons * rng.lognormal(0.0, brightness_cv, len(cells))
        frames.append(_draw((ny * b, nx * b), cells, w, packer.radius, pixel_size_um, background, offset, rng))
    pixel_mask = np.repeat(np.repeat(mask, b, axis=0), b, axis=1)
    return np.stack(frames), drawn, pixel_mask

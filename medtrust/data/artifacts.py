"""SAFEGEN's artifact benchmark: the four artifact cohorts of the seed, injected into clean held-out
images, each injection with an exact ground-truth mask and a severity level 1-5.

1. ``displaced`` -- anatomically impossible juxtapositions: a patch displaced to a far place, duplicated
   next to itself, or mirrored in place;
2. ``noise`` -- noise and motion patterns: directional motion blur, ghosting (a shifted faint copy),
   stripes;
3. ``extreme`` -- intensity extremes: saturated or hyper-attenuated blobs;
4. ``subtle`` -- subtle physiological inconsistencies: a local texture swap, a small warp, a duplicated
   nodule-sized patch.

The mask of an injection is exact: every pixel the injection changes lies inside it (a unit test checks
that the image is bit-identical outside), and it holds only the region the artifact was written to.
Severity orders how much an injection changes the image, whatever the image's content: (1) the size
and strength parameters of every kind grow geometrically from level 1 (at the edge of visibility) to
level 5 (gross); (2) for a content-dependent change (a displaced patch onto similar tissue changes
little), ``inject`` draws ``candidates`` placements at the level's parameters and keeps the one whose
total absolute change ranks at the level's quantile (level 1 the least conspicuous, 5 the most). Unit
tests check that the total change rises with severity within every kind and that the rank correlation
of change and severity is high in every cohort. Every injection depends only on ``(seed, image index,
cohort, severity, draw)``, so the set is reproducible from its seed.

Images are float arrays in [0, 1], ``H×W`` or ``H×W×C``; masks are boolean ``H×W``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import convolve, gaussian_filter, map_coordinates, rotate

from medtrust.data.phantoms import seeded_rng

COHORTS: dict[str, tuple[str, ...]] = {
    "displaced": ("displace", "duplicate", "mirror"),
    "noise": ("motion_blur", "ghosting", "stripes"),
    "extreme": ("saturated", "hyperattenuated"),
    "subtle": ("texture_swap", "warp", "nodule_duplicate"),
}
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass
class Injection:
    """One injected artifact: the changed image, its exact mask, what and how strong."""

    image: np.ndarray
    mask: np.ndarray
    cohort: str
    kind: str
    severity: int
    params: dict[str, Any] = field(default_factory=dict)


# -- geometry helpers ------------------------------------------------------------------------------
def _geo(s: int, lo: float, hi: float) -> float:
    """A parameter that grows geometrically from ``lo`` at severity 1 to ``hi`` at severity 5."""
    return float(lo * (hi / lo) ** ((s - 1) / 4))


def _side(shape: tuple[int, ...], frac: float, lo: int = 3) -> int:
    return max(lo, int(round(min(shape[0], shape[1]) * frac)))


def _corner(rng: np.random.Generator, shape: tuple[int, ...], h: int, w: int, margin: int = 1) -> tuple[int, int]:
    H, W = shape[0], shape[1]
    y = int(rng.integers(margin, max(margin + 1, H - h - margin + 1)))
    x = int(rng.integers(margin, max(margin + 1, W - w - margin + 1)))
    return y, x


def _far_corner(rng: np.random.Generator, shape: tuple[int, ...], h: int, w: int, src: tuple[int, int],
                tries: int = 50) -> tuple[int, int]:
    """A corner whose patch does not overlap the source patch (the farthest of a few draws)."""
    best, best_d = None, -1.0
    for _ in range(tries):
        y, x = _corner(rng, shape, h, w)
        if abs(y - src[0]) >= h or abs(x - src[1]) >= w:
            d = float(np.hypot(y - src[0], x - src[1]))
            if d > best_d:
                best, best_d = (y, x), d
    if best is None:
        raise ValueError(f"image {shape[:2]} too small for a non-overlapping {h}×{w} patch")
    return best


def _disc(shape: tuple[int, ...], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _bump(shape: tuple[int, ...], cy: float, cx: float, r: float) -> np.ndarray:
    """A smooth bump that is 1 at the centre and exactly 0 outside the disc of radius r."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / max(r, 1e-6) ** 2
    return np.where(d2 < 1, np.cos(np.clip(d2, 0, 1) * np.pi / 2) ** 2, 0.0)


def _expand(a: np.ndarray, img: np.ndarray) -> np.ndarray:
    return a[..., None] if img.ndim == 3 else a


def _finish(original: np.ndarray, out: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip to [0, 1], keep every pixel outside ``region`` bit-identical, and return the exact mask: the
    region's pixels that changed."""
    out = np.clip(out, 0.0, 1.0).astype(original.dtype)
    out = np.where(_expand(region, original), out, original)
    changed = (out != original) if original.ndim == 2 else (out != original).any(axis=2)
    return out, changed & region


# -- the cohorts -----------------------------------------------------------------------------------
def _displaced(img: np.ndarray, kind: str, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    side = _side(img.shape, _geo(s, 0.12, 0.28))  # 12 % ... 28 % of the short side
    src = _corner(rng, img.shape, side, side)
    patch = img[src[0]:src[0] + side, src[1]:src[1] + side].copy()
    if kind == "mirror":
        dst = src
        patch = patch[:, ::-1] if rng.random() < 0.5 else patch[::-1, :]
    elif kind == "duplicate":  # next to the source: a doubled structure
        H, W = img.shape[:2]
        options = [(src[0], src[1] + side), (src[0], src[1] - side), (src[0] + side, src[1]), (src[0] - side, src[1])]
        options = [(y, x) for y, x in options if 0 <= y <= H - side and 0 <= x <= W - side]
        dst = options[int(rng.integers(len(options)))] if options else _far_corner(rng, img.shape, side, side, src)
    else:  # displace: somewhere far
        dst = _far_corner(rng, img.shape, side, side, src)
    out = img.copy()
    out[dst[0]:dst[0] + side, dst[1]:dst[1] + side] = patch
    region = np.zeros(img.shape[:2], bool)
    region[dst[0]:dst[0] + side, dst[1]:dst[1] + side] = True
    return out, region, {"side": side, "source": list(src), "target": list(dst)}


def _band(rng: np.random.Generator, shape: tuple[int, ...], s: int) -> tuple[np.ndarray, dict]:
    H, W = shape[:2]
    h = _side(shape, _geo(s, 0.15, 0.5))
    w = _side(shape, _geo(s, 0.3, 0.9))
    h, w = min(h, H - 2), min(w, W - 2)
    y, x = _corner(rng, shape, h, w)
    region = np.zeros((H, W), bool)
    region[y:y + h, x:x + w] = True
    return region, {"box": [y, x, h, w]}


def _noise(img: np.ndarray, kind: str, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    region, params = _band(rng, img.shape, s)
    angle = float(rng.uniform(0, 180))
    if kind == "motion_blur":
        length = 2 * int(round(_geo(s, 2, 10))) + 1  # 5 ... 21 px
        k = np.zeros((length, length))
        k[length // 2, :] = 1.0
        k = rotate(k, angle, reshape=False, order=1)
        k /= k.sum()
        out = convolve(img, k[..., None] if img.ndim == 3 else k, mode="reflect")
        params.update(length=length, angle=angle)
    elif kind == "ghosting":
        shift = _side(img.shape, _geo(s, 0.05, 0.2))
        alpha = _geo(s, 0.15, 0.6)
        axis = int(rng.integers(2))
        ghost = np.roll(img, shift, axis=axis)
        out = (1 - alpha) * img + alpha * ghost
        params.update(shift=shift, alpha=alpha, axis=axis)
    else:  # stripes
        period = float(rng.uniform(3, 6))
        amp = _geo(s, 0.06, 0.3)
        yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
        theta = np.deg2rad(angle)
        wave = amp * np.sin(2 * np.pi * (yy * np.cos(theta) + xx * np.sin(theta)) / period)
        out = img + _expand(wave, img)
        params.update(period=period, amplitude=amp, angle=angle)
    return out, region, params


def _extreme(img: np.ndarray, kind: str, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    r = _side(img.shape, _geo(s, 0.05, 0.14), lo=2)  # radius 5 % ... 14 % of the short side
    cy, cx = _corner(rng, img.shape, 2 * r, 2 * r)
    cy, cx = cy + r, cx + r
    strength = _geo(s, 0.5, 1.0)  # of the way to the extreme
    target = 1.0 if kind == "saturated" else 0.0
    a = strength * np.clip(_bump(img.shape, cy, cx, r) * 1.6, 0, 1)  # a flat top, then a smooth rim
    out = (1 - _expand(a, img)) * img + _expand(a, img) * target
    return out, a > 0, {"radius": r, "centre": [cy, cx], "strength": strength}


def _subtle(img: np.ndarray, kind: str, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    H, W = img.shape[:2]
    if kind == "texture_swap":  # two small patches trade places (each keeps its own statistics elsewhere)
        side = _side(img.shape, _geo(s, 0.08, 0.18))
        a = _corner(rng, img.shape, side, side)
        b = _far_corner(rng, img.shape, side, side, a)
        out = img.copy()
        pa, pb = img[a[0]:a[0] + side, a[1]:a[1] + side].copy(), img[b[0]:b[0] + side, b[1]:b[1] + side].copy()
        out[a[0]:a[0] + side, a[1]:a[1] + side], out[b[0]:b[0] + side, b[1]:b[1] + side] = pb, pa
        region = np.zeros((H, W), bool)
        region[a[0]:a[0] + side, a[1]:a[1] + side] = region[b[0]:b[0] + side, b[1]:b[1] + side] = True
        return out, region, {"side": side, "patches": [list(a), list(b)]}
    if kind == "warp":  # a local swirl: displacement with compact support
        r = _side(img.shape, _geo(s, 0.1, 0.22))
        cy, cx = _corner(rng, img.shape, 2 * r, 2 * r)
        cy, cx = cy + r, cx + r
        bump = _bump(img.shape, cy, cx, r)
        angle = _geo(s, 0.35, 1.2) * (1 if rng.random() < 0.5 else -1)  # radians at the centre
        yy, xx = np.mgrid[:H, :W].astype(float)
        t = angle * bump
        dy, dx = yy - cy, xx - cx
        sy, sx = cy + np.cos(t) * dy - np.sin(t) * dx, cx + np.sin(t) * dy + np.cos(t) * dx
        if img.ndim == 2:
            out = map_coordinates(img, [sy, sx], order=1, mode="nearest")
        else:
            out = np.stack([map_coordinates(img[..., c], [sy, sx], order=1, mode="nearest")
                            for c in range(img.shape[2])], axis=2)
        return out, bump > 0, {"radius": r, "centre": [cy, cx], "angle": angle}
    # nodule_duplicate: a small bright spot copied next to itself (a doubled nodule) with a soft edge
    r = _side(img.shape, _geo(s, 0.03, 0.06), lo=2)
    gray = img if img.ndim == 2 else img.mean(axis=2)
    smooth = gaussian_filter(gray, 1.0)
    inner = smooth[2 * r:H - 2 * r, 2 * r:W - 2 * r]
    flat = np.argsort(inner, axis=None)[-max(1, inner.size // 10):]  # among the brightest tenth
    iy, ix = np.unravel_index(flat[int(rng.integers(len(flat)))], inner.shape)
    sy, sx = iy + 2 * r, ix + 2 * r
    ang = rng.uniform(0, 2 * np.pi)
    dist = 2.2 * r
    ty = int(np.clip(round(sy + dist * np.sin(ang)), r, H - r - 1))
    tx = int(np.clip(round(sx + dist * np.cos(ang)), r, W - r - 1))
    a = np.clip(_bump(img.shape, ty, tx, r + 1) * _geo(s, 0.6, 1.0), 0, 1)
    src = np.roll(np.roll(img, ty - sy, axis=0), tx - sx, axis=1)
    out = (1 - _expand(a, img)) * img + _expand(a, img) * src
    return out, a > 0, {"radius": r, "source": [int(sy), int(sx)], "target": [ty, tx]}


_COHORT_FN: dict[str, Callable[..., tuple[np.ndarray, np.ndarray, dict]]] = {
    "displaced": _displaced, "noise": _noise, "extreme": _extreme, "subtle": _subtle}


def inject(image: np.ndarray, cohort: str, severity: int, rng: np.random.Generator, kind: str | None = None,
           min_changed: int = 4, tries: int = 8, candidates: int = 5) -> Injection:
    """Inject one artifact of ``cohort`` at ``severity`` into ``image`` (float in [0, 1]).

    The returned mask holds exactly the pixels that changed. ``candidates`` placements are drawn at the
    severity's parameters and the one whose total absolute change ranks at the severity's quantile is
    kept (severity 1 the smallest change, 5 the largest; ``candidates=1`` keeps the first draw). A draw
    that changes fewer than ``min_changed`` pixels (a displaced patch onto an identical flat background)
    is not a candidate.

    Raises:
        ValueError: unknown cohort or kind, a severity outside 1-5, an image that is not float in
            [0, 1] of shape H×W or H×W×C, or an image too flat for the artifact to change it.
    """
    if cohort not in COHORTS:
        raise ValueError(f"unknown artifact cohort {cohort!r}; expected one of {list(COHORTS)}")
    if int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"artifact severity must be an integer 1-5, got {severity!r}")
    if int(candidates) < 1:
        raise ValueError(f"candidates={candidates!r}: expected an integer >= 1")
    img = np.asarray(image)
    if img.ndim not in (2, 3) or not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"inject expects a float image H×W or H×W×C in [0, 1], got {img.dtype} {img.shape}")
    if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise ValueError("inject expects finite values in [0, 1]")
    kinds = COHORTS[cohort]
    if kind is not None and kind not in kinds:
        raise ValueError(f"unknown kind {kind!r} of cohort {cohort!r}; expected one of {list(kinds)}")
    k = kind or kinds[int(rng.integers(len(kinds)))]
    found: list[tuple[float, Injection]] = []
    for _ in range(tries * int(candidates)):
        out, region, params = _COHORT_FN[cohort](img, k, int(severity), rng)
        out, mask = _finish(img, out, region)
        if int(mask.sum()) >= min_changed:
            change = float(np.abs(out.astype(np.float64) - img).sum())
            found.append((change, Injection(out, mask, cohort, k, int(severity), {**params, "change": change})))
            if len(found) == int(candidates):
                break
    if not found:
        raise ValueError(f"{cohort} artifacts change fewer than {min_changed} pixels of this image after "
                         f"{tries * int(candidates)} draws (a flat image?)")
    found.sort(key=lambda t: t[0])
    return found[int(round((int(severity) - 1) / 4 * (len(found) - 1)))][1]


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactSpec:
    """What the benchmark holds: cohorts, severities, injections per (cohort, severity), clean images."""

    cohorts: tuple[str, ...] = tuple(COHORTS)
    severities: tuple[int, ...] = SEVERITIES
    per_severity: int = 20
    n_clean: int | None = None  # None: every source image once
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, where: str = "artifacts") -> "ArtifactSpec":
        """Validate a config mapping, naming the key of any bad value."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"cohorts", "severities", "per_severity", "n_clean", "seed"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected cohorts, severities, per_severity, "
                             "n_clean, seed")
        cohorts = tuple(cfg.get("cohorts") or COHORTS)
        bad = [c for c in cohorts if c not in COHORTS]
        if bad:
            raise ValueError(f"{where}.cohorts: unknown cohort(s) {bad}; expected some of {list(COHORTS)}")
        sev = tuple(cfg.get("severities") or SEVERITIES)
        if any(not isinstance(s, (int, np.integer)) or not 1 <= int(s) <= 5 for s in sev):
            raise ValueError(f"{where}.severities: expected integers 1-5, got {list(sev)}")
        per = cfg.get("per_severity", 20)
        if not isinstance(per, (int, np.integer)) or per < 1:
            raise ValueError(f"{where}.per_severity: expected an integer >= 1, got {per!r}")
        n_clean = cfg.get("n_clean")
        if n_clean is not None and (not isinstance(n_clean, (int, np.integer)) or n_clean < 1):
            raise ValueError(f"{where}.n_clean: expected null or an integer >= 1, got {n_clean!r}")
        return cls(cohorts, tuple(int(s) for s in sev), int(per), None if n_clean is None else int(n_clean),
                   int(cfg.get("seed", 0)))


def build_benchmark(images: Sequence[np.ndarray], spec: ArtifactSpec, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The benchmark over clean held-out ``images``: ``n_clean`` clean rows (label 0, empty mask) and, for
    every cohort and severity, ``per_severity`` injected rows (label 1), each into a source image drawn
    from the seed. Rows: ``id, source, image, mask, label, cohort ("clean" for negatives), kind, severity
    (0 for clean), params``.

    Raises:
        ValueError: no images.
    """
    if not len(images):
        raise ValueError("the artifact benchmark needs at least one clean image (the split is empty)")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    rows: list[dict[str, Any]] = []
    n = len(images)
    order = seeded_rng(spec.seed, "artifacts", "clean").permutation(n)
    n_clean = n if spec.n_clean is None else min(spec.n_clean, n)
    for j in order[:n_clean]:
        img = np.asarray(images[j])
        rows.append({"id": f"clean_{ids[j]}", "source": ids[j], "image": img, "mask": np.zeros(img.shape[:2], bool),
                     "label": 0, "cohort": "clean", "kind": "clean", "severity": 0, "params": {}})
    for cohort in spec.cohorts:
        for sev in spec.severities:
            for d in range(spec.per_severity):
                rng = seeded_rng(spec.seed, "artifacts", cohort, sev, d)
                j = int(rng.integers(n))
                inj = inject(np.asarray(images[j]), cohort, sev, rng)
                rows.append({"id": f"{cohort}_s{sev}_{d:03d}_{ids[j]}", "source": ids[j], "image": inj.image,
                             "mask": inj.mask, "label": 1, "cohort": cohort, "kind": inj.kind, "severity": sev,
                             "params": inj.params})
    return rows

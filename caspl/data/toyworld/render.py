"""ToyWorld's procedural renderer: seeded attributes -> uint8 images and captions, vectorised over a batch.

An image holds one object (shape, colour, size, texture, position, small rotation) on a background, drawn in one
visual domain. `sample_attributes` draws everything random, including a per-image noise seed, so `render` is a
pure function of the attributes: the same attributes give the same bytes, whatever else is in the batch.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np

from caspl.errors import ConfigError

GENERATOR_VERSION = 106  # bump on any change that alters rendered bytes or captions (it is part of cache keys)

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "pentagon", "crescent")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (250, 130, 190),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
}
COLOR_NAMES = tuple(COLORS)
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "large")
DOMAINS = ("clean", "noisy", "sketch", "dark", "textured", "faded", "underwater")
VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "color": COLOR_NAMES, "texture": TEXTURES, "size": SIZES, "domain": DOMAINS,
}

_RGB = np.array(list(COLORS.values()), dtype=np.float32)
_RADIUS = {"small": (0.22, 0.27), "large": (0.32, 0.40)}  # fraction of the image side
_NOISE = {"clean": (0.0, 0.0), "noisy": (18.0, 32.0), "sketch": (3.0, 6.0), "dark": (4.0, 8.0), "textured": (3.0, 6.0),
          "faded": (3.0, 6.0), "underwater": (3.0, 6.0)}
_FADE = (0.35, 0.5)  # faded: the share of the picture's contrast left after washing it out toward white
_WATER_TINT = np.array([0.4, 0.8, 0.95], dtype=np.float32)  # underwater: red light is absorbed first...
_WATER_HAZE = np.array([0.0, 35.0, 60.0], dtype=np.float32)  # ...and blue-green scattered light is added


# ----------------------------------------------------------------------------------------------------- sampling
def _indices(attribute: str, names: Sequence[str] | None) -> np.ndarray:
    vocab = VOCAB[attribute]
    names = vocab if names is None else names
    unknown = [n for n in names if n not in vocab]
    if unknown or not names:
        raise ConfigError(f"ToyWorld {attribute} {unknown or '[]'} invalid; choose from {list(vocab)}")
    return np.array([vocab.index(n) for n in names], dtype=np.int16)


def sample_attributes(
    rng: np.random.Generator,
    n: int,
    domains: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    textures: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
    image_size: int = 32,
    fixed: Mapping[str, np.ndarray] | None = None,
    domain_weights: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Attributes of n images, each a length-n array (categorical ones as vocabulary indices).

    The name lists restrict the uniform choice of each categorical attribute (`domain_weights`, one per name in
    `domains`, makes the domain choice non-uniform); `fixed` sets categorical attributes per image (index arrays)
    before the dependent ones (radius, position) are drawn.
    """
    choice = {"domain": domains, "shape": shapes, "color": colors, "texture": textures, "size": sizes}
    attrs: dict[str, np.ndarray] = {}
    for name, allowed in choice.items():
        pool = _indices(name, allowed)
        if name == "domain" and domain_weights is not None:
            attrs[name] = pool[rng.choice(len(pool), n, p=_probabilities(domain_weights, len(pool)))]
        else:
            attrs[name] = pool[rng.integers(0, len(pool), n)]
    for name, values in (fixed or {}).items():
        if name not in VOCAB:
            raise ConfigError(f"ToyWorld: cannot fix {name!r}; fixable: {list(VOCAB)}")
        attrs[name] = np.broadcast_to(np.asarray(values, dtype=np.int16), (n,)).copy()
        if n and not (0 <= attrs[name].min() and attrs[name].max() < len(VOCAB[name])):
            raise ConfigError(f"ToyWorld: fixed {name} indices must lie in [0, {len(VOCAB[name])})")

    S = float(image_size)
    lo = np.array([_RADIUS[s][0] for s in SIZES], dtype=np.float32)[attrs["size"]]
    hi = np.array([_RADIUS[s][1] for s in SIZES], dtype=np.float32)[attrs["size"]]
    radius = (lo + (hi - lo) * rng.random(n, dtype=np.float32)) * S
    margin = radius + 1.0
    attrs.update(
        canvas=np.full(n, image_size, dtype=np.int16),
        radius=radius,
        cx=(margin + (S - 2 * margin) * rng.random(n, dtype=np.float32)),
        cy=(margin + (S - 2 * margin) * rng.random(n, dtype=np.float32)),
        rotation=rng.uniform(-0.26, 0.26, n).astype(np.float32),  # small: a turned square must not be a diamond
        rgb=np.clip(_RGB[attrs["color"]] + rng.uniform(-12, 12, (n, 3)), 0, 255).astype(np.float32),
        background=_sample_backgrounds(rng, attrs["domain"]),
        background2=rng.uniform(60, 190, (n, 3)).astype(np.float32),
        waves=np.concatenate(
            [rng.uniform(-0.5, 0.5, (n, 4)), rng.uniform(0, 2 * np.pi, (n, 2))], axis=1
        ).astype(np.float32),
        ink=rng.uniform(10, 70, n).astype(np.float32),
        brightness=np.where(attrs["domain"] == DOMAINS.index("dark"), rng.uniform(0.35, 0.55, n), 1.0).astype(
            np.float32
        ),
        fade=np.where(attrs["domain"] == DOMAINS.index("faded"), rng.uniform(*_FADE, n), 1.0).astype(np.float32),
        period=(rng.uniform(3.5, 5.0, n) * S / 32).astype(np.float32),
        phase=rng.uniform(0, 8, n).astype(np.float32),
        noise=_sample_noise(rng, attrs["domain"]),
        seed=rng.integers(0, 2**63 - 1, n, dtype=np.int64).astype(np.uint64),
    )
    return attrs


def _probabilities(weights: Sequence[float], count: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != count or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"ToyWorld domain_weights {list(weights)} need one non-negative weight per domain "
                          f"({count}), not all zero")
    return w / w.sum()


def _sample_backgrounds(rng: np.random.Generator, domain: np.ndarray) -> np.ndarray:
    n = len(domain)
    gray = rng.uniform(90, 150, (n, 1)) + rng.uniform(-15, 15, (n, 3))  # clean, noisy
    paper = rng.uniform(215, 250, (n, 1)) + rng.uniform(-5, 5, (n, 3))
    dark = rng.uniform(5, 35, (n, 1)) + rng.uniform(-4, 4, (n, 3))
    muted = rng.uniform(60, 190, (n, 3))
    by_domain = {"sketch": paper, "dark": dark, "textured": muted}
    out = gray
    for name, value in by_domain.items():
        out = np.where((domain == DOMAINS.index(name))[:, None], value, out)
    return np.clip(out, 0, 255).astype(np.float32)


def _sample_noise(rng: np.random.Generator, domain: np.ndarray) -> np.ndarray:
    lo = np.array([_NOISE[d][0] for d in DOMAINS], dtype=np.float32)[domain]
    hi = np.array([_NOISE[d][1] for d in DOMAINS], dtype=np.float32)[domain]
    return (lo + (hi - lo) * rng.random(len(domain), dtype=np.float32)).astype(np.float32)


def concat_attributes(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def take_attributes(attrs: Mapping[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in attrs.items()}


# ------------------------------------------------------------------------------------------------------ shapes
def _polygon(u: np.ndarray, v: np.ndarray, sides: int, first_normal: float) -> np.ndarray:
    """Regular polygon with circumradius 1: inside every face's half-plane (apothem cos(pi/sides))."""
    apothem = np.float32(math.cos(math.pi / sides))
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        angle = first_normal + 2 * math.pi * k / sides
        inside &= u * np.float32(math.cos(angle)) + v * np.float32(math.sin(angle)) <= apothem
    return inside


def _exact32(fn, *args: np.ndarray) -> np.ndarray:
    """A transcendental function in float64, rounded to float32.

    SIMD builds of numpy may differ in the last float64 bit; rounding to float32 hides that, so the same
    attributes give the same pixels on every machine (plain float32 arithmetic is exact IEEE everywhere).
    """
    return fn(*(a.astype(np.float64) for a in args)).astype(np.float32)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    turn = (_exact32(np.arctan2, v, u) + np.float32(np.pi / 2)) / np.float32(2 * np.pi / 5)  # a point straight up
    spike = np.abs(2 * (turn - np.floor(turn)) - 1)  # 1 at the 5 points, 0 between them
    return u * u + v * v <= (0.42 + 0.58 * spike) ** 2


_SHAPE_FN = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: _polygon(u, v, 4, 0.0),
    "triangle": lambda u, v: _polygon(u, v, 3, np.pi / 2),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "ring": lambda u, v: ((r2 := u * u + v * v) <= 1.0) & (r2 >= 0.36),
    "diamond": lambda u, v: np.abs(u) / 0.7 + np.abs(v) <= 1.0,
    "hexagon": lambda u, v: _polygon(u, v, 6, 0.0),
    "pentagon": lambda u, v: _polygon(u, v, 5, np.pi / 2),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.72),
}
assert tuple(_SHAPE_FN) == SHAPES


def _masks(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    mask = np.zeros(u.shape, dtype=bool)
    for index in np.unique(shape):
        rows = np.flatnonzero(shape == index)
        mask[rows] = _SHAPE_FN[SHAPES[index]](u[rows], v[rows])
    return mask


def _texture(texture: np.ndarray, pu: np.ndarray, pv: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """True where the object shows its second colour; pu, pv are object-frame pixel offsets."""
    out = np.zeros(pu.shape, dtype=bool)
    for name, pattern in _PATTERNS.items():
        rows = np.flatnonzero(texture == TEXTURES.index(name))
        if len(rows):
            P, shift = period[rows, None, None], phase[rows, None, None]
            out[rows] = pattern(pu[rows] + shift, pv[rows] + shift, P)
    return out


_PATTERNS = {
    "striped": lambda a, b, P: np.floor((a + b) * np.float32(0.7071) / (P / 2)) % 2 == 1,
    "dotted": lambda a, b, P: ((a % P) - P / 2) ** 2 + ((b % P) - P / 2) ** 2 <= (0.3 * P) ** 2,
    "checkered": lambda a, b, P: (np.floor(a / (P / 2)) + np.floor(b / (P / 2))) % 2 == 1,
}


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[:, 1:, :] &= mask[:, :-1, :]
    out[:, :-1, :] &= mask[:, 1:, :]
    out[:, :, 1:] &= mask[:, :, :-1]
    out[:, :, :-1] &= mask[:, :, 1:]
    return out


# ------------------------------------------------------------------------------------------------------- noise
def _hash_uniform(seed: np.ndarray, count: int) -> np.ndarray:
    """[n, count] floats in [-1, 1) from a splitmix64 hash of (per-image seed, element index).

    Each 64-bit hash is cut into four 16-bit uniforms: a quarter of the hashing work.
    """
    words = -(-count // 4)
    with np.errstate(over="ignore"):
        x = seed[:, None] + np.arange(1, words + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    bits = x.astype("<u8").view("<u2")[:, :count]  # fixed byte order: same bytes on any machine
    return bits.astype(np.float32) * np.float32(2.0 / 65536) - np.float32(1.0)


# ------------------------------------------------------------------------------------------------------ render
def render(attrs: Mapping[str, np.ndarray]) -> np.ndarray:
    """uint8 images [n, H, W, 3] of the attributes (all images of one call share the canvas size)."""
    n = len(attrs["shape"])
    sizes = np.unique(attrs["canvas"])
    if len(sizes) > 1:
        raise ValueError(f"render: one canvas size per call, got {sizes.tolist()}")
    S = int(sizes[0]) if n else 32
    grid = np.arange(S, dtype=np.float32) + np.float32(0.5)
    dx = grid[None, None, :] - attrs["cx"][:, None, None]
    dy = grid[None, :, None] - attrs["cy"][:, None, None]
    cos = _exact32(np.cos, attrs["rotation"])[:, None, None]
    sin = _exact32(np.sin, attrs["rotation"])[:, None, None]
    pu, pv = dx * cos + dy * sin, dy * cos - dx * sin
    inv_r = (1.0 / attrs["radius"])[:, None, None]
    mask = _masks(attrs["shape"], pu * inv_r, pv * inv_r)

    second = _texture(attrs["texture"], pu, pv, attrs["period"], attrs["phase"])
    rgb = attrs["rgb"]
    bright = rgb[:, 0] * np.float32(0.299) + rgb[:, 1] * np.float32(0.587) + rgb[:, 2] * np.float32(0.114) > 110
    alt = np.where(bright[:, None], rgb * 0.35, rgb * 0.35 + 165).astype(np.float32)
    obj = np.where(second[..., None], alt[:, None, None, :], rgb[:, None, None, :])
    edge = mask & ~_erode(mask)  # a darker rim keeps the silhouette whole whatever the texture and background
    obj = np.where(edge[..., None], (rgb * np.float32(0.45))[:, None, None, :], obj)
    obj *= attrs["brightness"][:, None, None, None]

    img = _backgrounds(attrs, grid)
    domain = attrs["domain"]
    filled = mask & (domain != DOMAINS.index("sketch"))[:, None, None]
    img = np.where(filled[..., None], obj, img)
    img = _draw_sketches(img, attrs, mask)
    water = np.flatnonzero(attrs["domain"] == DOMAINS.index("underwater"))
    if len(water):
        img[water] = img[water] * _WATER_TINT + _WATER_HAZE
    faded = np.flatnonzero(attrs["fade"] < 1)
    if len(faded):  # washed out: every colour moves most of the way to white
        keep = attrs["fade"][faded, None, None, None]
        img[faded] = np.float32(255) - (np.float32(255) - img[faded]) * keep

    noisy = np.flatnonzero(attrs["noise"] > 0)
    if len(noisy):
        grain = _hash_uniform(attrs["seed"][noisy], S * S * 3).reshape(len(noisy), S, S, 3)
        img[noisy] += grain * (attrs["noise"][noisy] * np.float32(np.sqrt(3.0)))[:, None, None, None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _backgrounds(attrs: Mapping[str, np.ndarray], grid: np.ndarray) -> np.ndarray:
    n, S = len(attrs["shape"]), len(grid)
    img = np.broadcast_to(attrs["background"][:, None, None, :], (n, S, S, 3)).copy()
    rows = np.flatnonzero(attrs["domain"] == DOMAINS.index("textured"))
    if len(rows):
        w = attrs["waves"][rows]
        x, y = grid[None, None, :], grid[:, None][None]
        blend = 0.5 + 0.25 * (
            _exact32(np.sin, w[:, 0, None, None] * x + w[:, 1, None, None] * y + w[:, 4, None, None])
            + _exact32(np.sin, w[:, 2, None, None] * x + w[:, 3, None, None] * y + w[:, 5, None, None])
        )
        a, b = attrs["background"][rows], attrs["background2"][rows]
        img[rows] = blend[..., None] * a[:, None, None, :] + (1 - blend[..., None]) * b[:, None, None, :]
    return img


def _draw_sketches(img: np.ndarray, attrs: Mapping[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(attrs["domain"] == DOMAINS.index("sketch"))
    if len(rows):
        once = _erode(mask[rows])
        inner = np.where((attrs["size"][rows] == SIZES.index("large"))[:, None, None], _erode(once), once)
        edge = mask[rows] & ~inner
        img[rows] = np.where(edge[..., None], attrs["ink"][rows, None, None, None], img[rows])
    return img


# ----------------------------------------------------------------------------------------------------- captions
# Captions read like varied web alt-text: an opener (neutral, or naming the domain), a random subset of the
# attributes as adjectives in varying order, sometimes a domain or position phrase after the noun, sometimes a
# relative clause or a bare tag list. Words before the noun carry information (domain, size, colour, texture), as
# they do for CLIP, so the text tower learns to let them steer the noun's features: what gives learned context
# tokens their leverage.
_NEUTRAL = ("a photo of", "a picture of", "an image of", "a rendering of", "a close-up of", "a snapshot of",
            "this is", "there is", "here is", "look at", "i see", "")
_OPENERS = {
    "clean": ("a clean photo of", "a sharp photo of", "a bright photo of", "a clear picture of"),
    "noisy": ("a noisy photo of", "a grainy picture of", "a low quality photo of", "a noisy image of"),
    "sketch": ("a sketch of", "a drawing of", "an outline of", "a pencil sketch of", "a line drawing of"),
    "dark": ("a dark photo of", "a dim picture of", "a low light photo of", "a dark image of"),
    "textured": ("a busy photo of", "a patterned photo of", "a cluttered picture of", "a photo with a pattern of"),
    "faded": ("a faded photo of", "a washed out photo of", "an overexposed photo of", "a pale picture of"),
    "underwater": ("an underwater photo of", "a photo taken under water of", "a diving photo of",
                   "a murky photo of"),
}
_SUFFIXES = {
    "clean": ("on a plain background", "on a grey background", "in a clean photo"),
    "noisy": ("with noise", "in a noisy photo", "with grain"),
    "sketch": ("on paper", "drawn in pencil", "in outline"),
    "dark": ("on a dark background", "in low light", "in the dark"),
    "textured": ("on a textured background", "in front of a pattern", "on a patterned background"),
    "faded": ("washed out", "in harsh light", "faded by the sun"),
    "underwater": ("under water", "in deep water", "seen through water"),
}
_DOMAIN_TAG = {"clean": "clean", "noisy": "noisy", "sketch": "sketch", "dark": "dark", "textured": "pattern",
               "faded": "faded", "underwater": "underwater"}
_TEXTURE_NOUN = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}
_PATTERN = "{color} {texture} texture."  # the wording of toy_textures' classes
_ARTICLE = re.compile(r"(^|\s)a ([aeiou])")


def _adjectives(rng: np.random.Generator, size: str, color: str, texture: str, sketch: bool) -> list[str]:
    """A random subset of the attribute words, in canonical order (size, colour, texture) or shuffled."""
    if sketch:  # a pencil outline shows neither colour nor texture
        return [size] if rng.random() < 0.7 else []
    keep = rng.random(3) < (0.5, 0.85, 0.3 if texture == "solid" else 0.75)
    words = [w for w, k in zip((size, color, texture), keep.tolist()) if k]
    if len(words) > 1 and rng.random() < 0.4:
        words = [words[i] for i in rng.permutation(len(words))]
    return words


def _position(cx: float, cy: float, size: float) -> str:
    col = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    return f"in the {row} {col}".replace("  ", " ").strip() if (row or col) else "in the center"


def _caption(rng: np.random.Generator, domain: str, size: str, color: str, texture: str, shape: str,
             where: str) -> str:
    sketch = domain == "sketch"
    adjectives = _adjectives(rng, size, color, texture, sketch)
    form = rng.random()
    if form < 0.12 and not sketch:  # the texture on its own, as toy_textures names it
        return _PATTERN.format(color=color, texture=texture)
    if form < 0.24:  # a bare tag list in random order
        tags = adjectives + [shape] + ([_DOMAIN_TAG[domain]] if rng.random() < 0.6 else [])
        return ", ".join(tags[i] for i in rng.permutation(len(tags))) + "."
    if form < 0.36 and adjectives:  # the attributes after the noun
        return f"a {shape} that is {' and '.join(adjectives)}."
    named = rng.random()
    opener = _OPENERS[domain][rng.integers(len(_OPENERS[domain]))] if named < 0.45 else \
        _NEUTRAL[rng.integers(len(_NEUTRAL))]
    generic = rng.random() < 0.15  # a hypernym, as captions often say "a red shape"
    noun = " ".join(adjectives + [("shape", "object")[int(rng.integers(2))] if generic else shape])
    if not sketch and texture != "solid" and texture not in adjectives and rng.random() < 0.2:
        noun += f" with {_TEXTURE_NOUN[texture]}"
    text = f"{opener} a {noun}".strip()
    if 0.45 <= named < 0.75:  # the domain after the noun instead
        text += " " + _SUFFIXES[domain][rng.integers(len(_SUFFIXES[domain]))]
    if rng.random() < 0.1:
        text += " " + where
    return text + "."


def captions(attrs: Mapping[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    """One caption per image (see the grammar above), a function of the attributes and `rng`."""
    out = []
    for i in range(len(attrs["shape"])):
        where = _position(float(attrs["cx"][i]), float(attrs["cy"][i]), float(attrs["canvas"][i]))
        text = _caption(rng, DOMAINS[attrs["domain"][i]], SIZES[attrs["size"][i]], COLOR_NAMES[attrs["color"][i]],
                        TEXTURES[attrs["texture"][i]], SHAPES[attrs["shape"][i]], where)
        out.append(_ARTICLE.sub(r"\1an \2", text))
    return out

"""The embedded benchmark world: a procedural camera-trap world in WILDS iWildCam v2.0 layout.

Why it exists: real CLIP weights and WILDS data cannot be downloaded everywhere, yet the
project's main job and tests must run on a fresh 2-core machine. This world is a stand-in that
reproduces the *phenomenon* AutoFT is about, not iWildCam itself:

* a "web" captioned set (for pretraining the tiny CLIP) shows every species on fresh random
  backgrounds, mostly by day, large, sharp and whole: broad, no location shortcut. Its captions name the
  species and, for some night shots, the night; by default never the ground (``web_ground_captions``), as
  web captions rarely describe a habitat: with ground captions the pretrained features carried the
  background, the shortcut cost fine-tuning more, and FT fell below zero-shot OOD on some seeds;
* camera-trap data (ID and OOD) is full of nuisances that are rare on the web: night (infrared:
  no colour, the flash lights the animal), small and partial animals, motion blur. Fine-tuning on ID therefore
  teaches something that also helps OOD;
* in the ID (training) locations two species dominate each camera and the camera's background
  is fixed, so species and background co-occur: a shortcut that naive fine-tuning learns. OOD
  cameras host any species; some stand in a habitat like a training camera's (same ground and
  texture), where the learned shortcut votes for the wrong species.

Version 3 was calibrated on its baselines only (``benchmarks/world_calibration.py``, calibration seeds 10
and 11, results and the variants tried in ``benchmarks/results/2026-11-30-embedded/calibration``): zero-shot
is good by day and poor at night; fine-tuning gains much more ID than OOD (OOD: night learned, day images at
new cameras lost to the shortcut); WiSE-FT is above FT OOD. No hand-set single-model objective of the
search space tried there beat FT OOD by the 3 points issue 13 asked for.

The camera-trap part is written to disk exactly as WILDS iWildCam v2.0 is laid out
(``iwildcam_v2.0/metadata.csv``, ``RELEASE_v2.0.txt``, images under ``train/``), so the real
``wilds`` loader reads it and ``dataset.eval`` scores it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from autoft import UserError

SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond", "bar", "cross")
PATTERNS = ("solid", "spots", "stripes", "twotone")
# Animal colours (RGB in [0, 1]); grounds use their own palette.
BODY_COLOURS = {
    "red": (0.85, 0.15, 0.1), "orange": (0.95, 0.55, 0.1), "yellow": (0.95, 0.9, 0.2),
    "blue": (0.15, 0.3, 0.9), "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
    "purple": (0.55, 0.2, 0.75), "pink": (0.95, 0.5, 0.7),
}
GROUND_COLOURS = {
    "green": (0.25, 0.55, 0.2), "brown": (0.45, 0.3, 0.15), "grey": (0.5, 0.5, 0.5),
    "sandy": (0.8, 0.7, 0.45), "olive": (0.45, 0.45, 0.15), "clay": (0.65, 0.35, 0.25),
    "snowy": (0.85, 0.88, 0.92), "teal": (0.2, 0.45, 0.45),
}
TEXTURES = ("grass", "rock", "sand", "leaf")


def config_hash(obj) -> str:
    """Short stable hash of a JSON-able config: the name of its cache entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Species:
    name: str
    shape: str
    colour: str
    pattern: str
    accent: str  # secondary colour of the pattern


# Ten species. Several share a shape or a body colour, so no single cue identifies a species; at
# night colour is gone and shape plus pattern must carry the decision.
DEFAULT_SPECIES = (
    Species("fox", "triangle", "orange", "solid", "white"),
    Species("deer", "bar", "orange", "spots", "white"),
    Species("boar", "circle", "black", "solid", "black"),
    Species("hare", "diamond", "white", "twotone", "black"),
    Species("lynx", "triangle", "yellow", "spots", "black"),
    Species("otter", "bar", "purple", "stripes", "black"),
    Species("badger", "square", "black", "stripes", "white"),
    Species("heron", "cross", "blue", "solid", "white"),
    Species("tapir", "circle", "pink", "twotone", "black"),
    Species("civet", "square", "red", "spots", "yellow"),
)


@dataclass(frozen=True)
class Nuisance:
    """Probabilities of the camera-trap nuisances; the web and the traps differ only here."""

    night: float
    small: float
    blur: float
    partial: float


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world; its hash keys the on-disk cache."""

    seed: int = 0
    n_train: int = 4000
    n_id_val: int = 600
    n_id_test: int = 1500
    n_ood_val: int = 2000
    n_ood_test: int = 4000
    n_train_locations: int = 10
    n_ood_val_locations: int = 8
    n_ood_test_locations: int = 12
    dominant: tuple[float, float] = (0.7, 0.3)  # share of a training camera's two main species
    leak: float = 0.05  # probability that an ID image shows any species instead
    ood_lookalike: float = 0.5  # share of OOD cameras in a training camera's habitat
    tail: float = 0.7  # training camera k holds a share proportional to tail**k of the ID images
    web_ground_captions: float = 0.0  # share of the web's day captions with context that name the ground
    trap: Nuisance = Nuisance(night=0.5, small=0.5, blur=0.4, partial=0.3)
    web: Nuisance = Nuisance(night=0.02, small=0.03, blur=0.03, partial=0.0)
    species: tuple[Species, ...] = DEFAULT_SPECIES
    version: int = 3  # bump when the renderer changes, so caches are rebuilt

    def key(self) -> str:
        """Hash of everything: keys the generated camera-trap dataset."""
        return config_hash(asdict(self))

    def web_key(self) -> str:
        """Hash of what the web set depends on: keys the pretrained model, so changing the
        camera-trap splits does not retrain it."""
        return config_hash({k: getattr(self, k) for k in ("seed", "web", "species", "version",
                                                          "web_ground_captions")})

    @classmethod
    def from_dict(cls, given: dict) -> WorldConfig:
        """Build from plain config values (nested nuisance dicts, lists for tuples)."""
        known = {f.name for f in fields(cls)} - {"species"}
        unknown = set(given) - known
        if unknown:
            raise UserError(f"unknown world settings: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        kw = dict(given)
        for k in ("trap", "web"):
            if k in kw:
                kw[k] = Nuisance(**{**asdict(getattr(cls, k)), **kw[k]})
        if "dominant" in kw:
            kw["dominant"] = tuple(kw["dominant"])
        return cls(**kw)

    @property
    def class_names(self) -> list[str]:
        return [s.name for s in self.species]


@dataclass
class Scene:
    """Per-image rendering parameters (arrays of length N)."""

    species: np.ndarray
    texture: np.ndarray
    ground: np.ndarray  # index into GROUND_COLOURS
    tex_freq: np.ndarray
    tex_angle: np.ndarray
    tex_phase: np.ndarray
    light: np.ndarray
    night: np.ndarray
    small: np.ndarray
    blur: np.ndarray
    partial: np.ndarray


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _col(v: np.ndarray) -> np.ndarray:
    return v[:, None, None]


def _backgrounds(sc: Scene, rng: np.random.Generator) -> np.ndarray:
    n = len(sc.species)
    grounds = np.array(list(GROUND_COLOURS.values()), dtype=np.float32)[sc.ground]  # [N,3]
    a = _col(sc.tex_angle)
    f = _col(sc.tex_freq)
    ph = _col(sc.tex_phase)
    u = _XX[None] * np.cos(a) + _YY[None] * np.sin(a)
    v = -_XX[None] * np.sin(a) + _YY[None] * np.cos(a)
    t = np.empty((n, SIZE, SIZE), np.float32)
    tex = sc.texture
    m = tex == 0  # grass: fine oriented stripes
    t[m] = (0.5 + 0.5 * np.sin(f * 2.5 * u + ph))[m]
    m = tex == 1  # rock: coarse blobs
    t[m] = (0.5 + 0.5 * np.sin(f * u + ph) * np.sin(f * v + 2 * ph))[m]
    m = tex == 2  # sand: grain
    t[m] = rng.random((int(m.sum()), SIZE, SIZE), dtype=np.float32) * 0.8 + 0.1
    m = tex == 3  # leaf litter: checkers
    t[m] = ((np.sin(f * 1.5 * u + ph) > 0) ^ (np.sin(f * 1.5 * v) > 0)).astype(np.float32)[m] * 0.7 + 0.15
    dark = grounds * 0.55
    img = dark[:, None, None, :] + (grounds - dark)[:, None, None, :] * t[..., None]
    return img


def _animals(sc: Scene, species: tuple[Species, ...], img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint each scene's animal into ``img`` in place; return the animal masks [N, 32, 32]."""
    n = len(sc.species)
    radius = np.where(sc.small, rng.uniform(3.5, 5.0, n), rng.uniform(5.0, 8.0, n)).astype(np.float32)
    margin = radius * 0.9
    cx = rng.uniform(margin, SIZE - margin)
    cy = rng.uniform(margin, SIZE - margin)
    # partial animals stand half out of the frame
    edge = rng.integers(0, 4, n)
    cx = np.where(sc.partial & (edge == 0), rng.uniform(-0.1, 0.3, n) * radius, cx)
    cx = np.where(sc.partial & (edge == 1), SIZE - rng.uniform(-0.1, 0.3, n) * radius, cx)
    cy = np.where(sc.partial & (edge == 2), rng.uniform(-0.1, 0.3, n) * radius, cy)
    cy = np.where(sc.partial & (edge == 3), SIZE - rng.uniform(-0.1, 0.3, n) * radius, cy)
    rot = rng.uniform(-0.5, 0.5, n)
    dx = (_XX[None] - _col(cx)) / _col(radius)
    dy = (_YY[None] - _col(cy)) / _col(radius)
    c, s = np.cos(_col(rot)), np.sin(_col(rot))
    u = c * dx + s * dy
    v = -s * dx + c * dy
    shape_masks = {
        "circle": u**2 + v**2 <= 1.0,
        "square": np.maximum(np.abs(u), np.abs(v)) <= 0.8,
        "triangle": (v <= 0.6) & (v >= 1.6 * np.abs(u) - 1.0),
        "diamond": np.abs(u) + np.abs(v) <= 1.0,
        "bar": (u / 1.1) ** 2 + (v / 0.45) ** 2 <= 1.0,
        "cross": ((np.abs(u) < 0.33) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.33) & (np.abs(u) < 1.0)),
    }
    freq = rng.uniform(4.0, 5.0, n)[:, None, None]
    pattern_masks = {
        "solid": np.zeros_like(u, dtype=bool),
        "spots": (np.sin(freq * u) * np.sin(freq * v)) > 0.45,
        "stripes": np.sin(freq * u) > 0.2,
        "twotone": v > 0.05,
    }
    jitter = rng.normal(0, 0.06, (n, 3)).astype(np.float32)
    body_mask = np.zeros(u.shape, bool)
    for k, sp in enumerate(species):
        idx = np.flatnonzero(sc.species == k)
        if not len(idx):
            continue
        body = np.clip(np.array(BODY_COLOURS[sp.colour], np.float32) + jitter[idx], 0, 1)
        accent = np.clip(np.array(BODY_COLOURS[sp.accent], np.float32) + jitter[idx], 0, 1)
        inside = shape_masks[sp.shape][idx]
        pat = pattern_masks[sp.pattern][idx] & inside
        sub = img[idx]
        sub[inside] = np.broadcast_to(body[:, None, None, :], sub.shape)[inside]
        sub[pat] = np.broadcast_to(accent[:, None, None, :], sub.shape)[pat]
        img[idx] = sub
        body_mask[idx] = inside
    return body_mask


def _box_blur(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            out += p[:, dy : dy + SIZE, dx : dx + SIZE]
    return out / 9.0


def render(sc: Scene, species: tuple[Species, ...], rng: np.random.Generator) -> np.ndarray:
    """Render scenes into uint8 images [N, 32, 32, 3]."""
    img = _backgrounds(sc, rng)
    body = _animals(sc, species, img, rng)
    img *= _col(sc.light)[..., None]
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)  # colour sensor noise
    night = np.flatnonzero(sc.night)
    if len(night):
        # infrared night shot: no colour; the flash lights the animal, the ground stays dark.
        # (a weighted sum, not a BLAS matmul: idle BLAS threads would spin beside torch)
        x = img[night]
        g = 0.3 * x[..., 0] + 0.59 * x[..., 1] + 0.11 * x[..., 2]
        g = np.where(body[night], 0.35 + 0.6 * g, 0.45 * g) * rng.uniform(0.8, 1.0, (len(night), 1, 1))
        img[night] = g[..., None]
    if sc.blur.any():
        img[sc.blur] = _box_blur(img[sc.blur])
    if len(night):
        img[night] += rng.normal(0, 0.03, (len(night), SIZE, SIZE, 1)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _nuisances(nz: Nuisance, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.random(n) < getattr(nz, k) for k in ("night", "small", "blur", "partial")}


def web_scenes(cfg: WorldConfig, n: int, rng: np.random.Generator) -> Scene:
    """Web images: any species on a fresh random background, few nuisances."""
    return Scene(
        species=rng.integers(0, len(cfg.species), n),
        texture=rng.integers(0, len(TEXTURES), n),
        ground=rng.integers(0, len(GROUND_COLOURS), n),
        tex_freq=rng.uniform(0.5, 1.6, n),
        tex_angle=rng.uniform(0, np.pi, n),
        tex_phase=rng.uniform(0, 2 * np.pi, n),
        light=rng.uniform(0.75, 1.15, n),
        **_nuisances(cfg.web, n, rng),
    )


WEB_CONTEXTS = ("", " on {texture} {ground} ground", " at night")


def web_captions(cfg: WorldConfig, sc: Scene, rng: np.random.Generator) -> list[str]:
    """Captions 'a photo of a {name}.', half of them with the scene's context."""
    out = []
    grounds = list(GROUND_COLOURS)
    detail = rng.random(len(sc.species)) < 0.5
    ground = rng.random(len(sc.species)) < cfg.web_ground_captions
    for i in range(len(sc.species)):
        name = cfg.species[sc.species[i]].name
        ctx = ""
        if detail[i] and sc.night[i]:
            ctx = " at night"
        elif detail[i] and ground[i]:
            ctx = f" on {TEXTURES[sc.texture[i]]} {grounds[sc.ground[i]]} ground"
        out.append(f"a photo of a {name}{ctx}.")
    return out


def generate_web(cfg: WorldConfig, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """The captioned 'web' pretraining set, rendered in memory in chunks."""
    rng = np.random.default_rng([cfg.seed, seed, 1])
    images, captions = [], []
    for start in range(0, n, 4096):
        sc = web_scenes(cfg, min(4096, n - start), rng)
        images.append(render(sc, cfg.species, rng))
        captions += web_captions(cfg, sc, rng)
    return np.concatenate(images), captions


@dataclass
class Location:
    texture: int
    ground: int
    freq: float
    angle: float
    phase: float
    light: float
    main: tuple[int, int] | None  # the camera's two dominant species (training cameras only)


def _locations(cfg: WorldConfig, rng: np.random.Generator) -> list[Location]:
    """Cameras: each has one fixed scene; training cameras also have two dominant species.

    (texture, ground) combos are drawn without replacement so no two cameras look alike, except that in each OOD
    split exactly ``round(ood_lookalike * n)`` cameras stand in a habitat like a training camera's (same ground and
    texture, another layout), where a learned background shortcut then votes for the wrong species. A fixed count,
    not a coin per camera: with a handful of cameras per split, coins made the shortcut's cost a lottery between
    world seeds.
    """
    n_id, n_val, n_test = cfg.n_train_locations, cfg.n_ood_val_locations, cfg.n_ood_test_locations
    n_all = n_id + n_val + n_test
    k = len(cfg.species)
    # each round of k // 2 training cameras pairs up the species anew, so every species dominates somewhere
    orders = np.concatenate([rng.permutation(k) for _ in range(-(-2 * n_id // k))])
    if n_all > len(TEXTURES) * len(GROUND_COLOURS):
        raise UserError(f"{n_all} cameras but only {len(TEXTURES) * len(GROUND_COLOURS)} distinct habitats")
    combos = rng.permutation(len(TEXTURES) * len(GROUND_COLOURS))[:n_all]
    for first, n in ((n_id, n_val), (n_id + n_val, n_test)):
        chosen = first + rng.permutation(n)[: round(cfg.ood_lookalike * n)]
        combos[chosen] = combos[rng.permutation(n_id)[np.arange(len(chosen)) % n_id]]
    locs = []
    for i, c in enumerate(combos):
        main = (int(orders[2 * i]), int(orders[2 * i + 1])) if i < n_id else None
        locs.append(Location(int(c // len(GROUND_COLOURS)), int(c % len(GROUND_COLOURS)),
                             float(rng.uniform(0.6, 1.4)), float(rng.uniform(0, np.pi)),
                             float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.8, 1.05)), main))
    return locs


def _trap_scenes(cfg: WorldConfig, locs: list[Location], loc_ids: np.ndarray, rng: np.random.Generator) -> Scene:
    n = len(loc_ids)
    k = len(cfg.species)
    species = np.empty(n, np.int64)
    for i, li in enumerate(loc_ids):
        main = locs[li].main
        if main is None or rng.random() < cfg.leak:
            species[i] = rng.integers(0, k)
        else:
            species[i] = main[0] if rng.random() < cfg.dominant[0] / sum(cfg.dominant) else main[1]
    loc = [locs[i] for i in loc_ids]
    return Scene(
        species=species,
        texture=np.array([l_.texture for l_ in loc]),
        ground=np.array([l_.ground for l_ in loc]),
        tex_freq=np.array([l_.freq for l_ in loc]) * rng.uniform(0.95, 1.05, n),
        tex_angle=np.array([l_.angle for l_ in loc]) + rng.normal(0, 0.05, n),
        tex_phase=np.array([l_.phase for l_ in loc]) + rng.normal(0, 0.2, n),
        light=np.array([l_.light for l_ in loc]) * rng.uniform(0.9, 1.1, n),
        **_nuisances(cfg.trap, n, rng),
    )


def _long_tail(n: int, n_loc: int, tail: float, rng: np.random.Generator) -> np.ndarray:
    """Camera of each image: camera sizes fall off geometrically (long-tailed, like iWildCam)."""
    w = tail ** np.arange(n_loc)
    return rng.choice(n_loc, size=n, p=w / w.sum())


SPLITS = ("train", "id_val", "id_test", "val", "test")


def write_iwildcam(cfg: WorldConfig, root: str | os.PathLike) -> Path:
    """Write the camera-trap world under ``root/iwildcam_v2.0`` in WILDS layout; return that folder.

    Written into a temporary folder and renamed at the end, so an interrupted run never leaves a
    half-written dataset where a complete one is expected.
    """
    import pandas as pd

    final = Path(root) / "iwildcam_v2.0"
    tmp = Path(root) / f".iwildcam_v2.0.tmp{os.getpid()}"
    (tmp / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 2])
    locs = _locations(cfg, rng)
    n_id = cfg.n_train_locations
    ood_val_ids = np.arange(n_id, n_id + cfg.n_ood_val_locations)
    ood_test_ids = np.arange(n_id + cfg.n_ood_val_locations, len(locs))
    id_pick = _long_tail(cfg.n_train + cfg.n_id_val + cfg.n_id_test, n_id, cfg.tail, rng)
    plan = {
        "train": id_pick[: cfg.n_train],
        "id_val": id_pick[cfg.n_train : cfg.n_train + cfg.n_id_val],
        "id_test": id_pick[cfg.n_train + cfg.n_id_val :],
        "val": rng.choice(ood_val_ids, cfg.n_ood_val),
        "test": rng.choice(ood_test_ids, cfg.n_ood_test),
    }
    rows = []
    base = np.datetime64("2013-01-01T00:00:00")
    for split in SPLITS:
        loc_ids = plan[split]
        sc = _trap_scenes(cfg, locs, loc_ids, rng)
        imgs = render(sc, cfg.species, rng)
        for i in range(len(imgs)):
            fname = f"{split}_{i:05d}.png"
            Image.fromarray(imgs[i]).save(tmp / "train" / fname, compress_level=1)
            hour = int(rng.integers(20, 28) % 24) if sc.night[i] else int(rng.integers(7, 18))
            when = base + np.timedelta64(int(rng.integers(0, 700)), "D") + np.timedelta64(hour, "h")
            rows.append({
                "split": split, "filename": fname, "y": int(sc.species[i]),
                "location_remapped": int(loc_ids[i]),
                "datetime": str(when).replace("T", " ") + ".000",
                "night": bool(sc.night[i]), "small": bool(sc.small[i]),
                "blur": bool(sc.blur[i]), "partial": bool(sc.partial[i]),
            })
    df = pd.DataFrame(rows)
    # WILDS requires every class, camera and sequence id to be present and contiguous
    missing = set(range(len(cfg.species))) - set(df["y"])
    if missing:
        raise RuntimeError(f"world too small: species {sorted(missing)} never drawn; raise the split sizes")
    df["location_remapped"] = pd.factorize(df["location_remapped"], sort=True)[0]
    df["sequence_remapped"] = np.arange(len(df))
    df.to_csv(tmp / "metadata.csv", index=False)
    (tmp / "categories.csv").write_text(
        "y,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(cfg.class_names)))
    (tmp / "world.json").write_text(json.dumps(asdict(cfg), indent=1))
    (tmp / "RELEASE_v2.0.txt").write_text("autoft embedded world (procedural stand-in, not iWildCam)\n")
    if final.exists():  # another process finished first; keep its copy
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return final


def cache_dir() -> Path:
    """Where generated worlds and pretrained tiny CLIPs live (``AUTOFT_CACHE`` overrides)."""
    return Path(os.environ.get("AUTOFT_CACHE", Path.home() / ".cache" / "autoft"))


def ensure_world(cfg: WorldConfig, root: str | os.PathLike | None = None) -> Path:
    """Return the WILDS root holding this world, generating it once."""
    root = Path(root) if root else cache_dir() / f"world-{cfg.key()}"
    if not (root / "iwildcam_v2.0" / "RELEASE_v2.0.txt").exists():
        root.mkdir(parents=True, exist_ok=True)
        write_iwildcam(cfg, root)
    return root

"""A small synthetic data set in the mmfuse data contract, so ``make demo`` runs with no download.

Every item belongs to one of eight latent categories and the category shows in every modality (words,
image colours, audio pitch, precomputed features), so content-based models have signal to find. Users
prefer one or two categories and lean towards popular items, which makes "most popular" a meaningful
but beatable baseline. Media use real formats (JPEG, PNG in files and inline, WAV, OGG/Vorbis) to
exercise the decoders. Everything comes from one ``numpy.random.default_rng(seed)``, so a seed gives
identical tables and image/WAV bytes (OGG streams carry a random serial from the encoder).

    python -m examples.demo_data --out /tmp/demo --items 300 --users 200 --seed 0
"""
from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image, ImageDraw

# name -> (RGB palette, title/description words, tags)
CATEGORIES = {
    "jazz": ([(120, 60, 20), (200, 150, 60), (40, 20, 10)], ["smoky", "saxophone", "swing", "brass", "club"],
             ["jazz", "saxophone", "swing", "live"]),
    "rock": ([(150, 20, 20), (30, 30, 30), (220, 220, 220)], ["loud", "guitar", "riff", "amplifier", "stage"],
             ["rock", "guitar", "band", "loud"]),
    "forest": ([(30, 110, 40), (90, 60, 30), (150, 200, 90)], ["green", "pine", "moss", "trail", "canopy"],
               ["forest", "trees", "hiking", "nature"]),
    "ocean": ([(20, 70, 160), (60, 170, 210), (230, 240, 250)], ["blue", "wave", "tide", "coral", "harbour"],
              ["ocean", "sea", "waves", "beach"]),
    "space": ([(10, 10, 40), (120, 60, 180), (250, 250, 200)], ["cosmic", "nebula", "orbit", "star", "rocket"],
              ["space", "stars", "galaxy", "astronomy"]),
    "desert": ([(220, 170, 90), (180, 90, 40), (250, 220, 150)], ["dry", "dune", "sand", "cactus", "mirage"],
               ["desert", "sand", "dunes", "heat"]),
    "city": ([(100, 100, 110), (240, 200, 40), (60, 60, 70)], ["urban", "street", "neon", "skyline", "traffic"],
             ["city", "urban", "streets", "night"]),
    "winter": ([(220, 230, 245), (150, 180, 220), (80, 100, 140)], ["frozen", "snow", "ice", "frost", "sleigh"],
               ["winter", "snow", "cold", "ice"]),
}
NAMES = list(CATEGORIES)
GENERIC_WORDS = ["classic", "new", "bright", "quiet", "bold", "simple", "warm", "rare", "daily", "soft"]
FEATURE_DIM = 16
CATALOG_START = np.datetime64("2026-10-01T00:00:00", "us")
CATALOG_END = np.datetime64("2026-11-20T00:00:00", "us")
EVENTS_START = np.datetime64("2026-10-01T00:00:00", "s")
EVENTS_END = np.datetime64("2026-11-25T00:00:00", "s")

CATALOG_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()),
    ("tags", pa.list_(pa.string())), ("image_uri", pa.string()), ("image_bytes", pa.binary()),
    ("audio_uri", pa.string()), ("audio_bytes", pa.binary()), ("features", pa.list_(pa.float32())),
    ("updated_at", pa.timestamp("us", tz="UTC")),
])
INTERACTIONS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.timestamp("s", tz="UTC")),
    ("event", pa.string()), ("weight", pa.float32()),
])


def _text(rng: np.random.Generator, cat: int, number: int) -> tuple[str, str, list[str]]:
    """Title, description and tags drawn mostly from the category's vocabulary, with some noise."""
    name = NAMES[cat]
    _, words, tags = CATEGORIES[name]
    w = rng.choice(words, size=3, replace=False)
    g = rng.choice(GENERIC_WORDS, size=2, replace=False)
    title = f"{w[0].title()} {name.title()} {w[1].title()} {number}"
    description = f"A {g[0]} {w[0]} piece about {w[1]} and {w[2]}. {g[1].capitalize()} {name} mood."
    item_tags = list(rng.choice(tags, size=int(rng.integers(2, 5)), replace=False))
    if rng.random() < 0.2:  # one off-category tag, so tags are not a perfect label
        other = CATEGORIES[NAMES[(cat + int(rng.integers(1, len(NAMES)))) % len(NAMES)]][2]
        item_tags[-1] = str(rng.choice(other))
    return title, description, [str(t) for t in item_tags]


def _image(rng: np.random.Generator, cat: int) -> Image.Image:
    """An RGB picture whose colours follow the category palette, with light noise."""
    palette = np.array(CATEGORIES[NAMES[cat]][0])
    w, h = (int(v) for v in rng.integers(96, 161, size=2))

    def jitter(colour: np.ndarray) -> tuple[int, ...]:
        return tuple(int(v) for v in np.clip(colour + rng.integers(-20, 21, size=3), 0, 255))

    img = Image.new("RGB", (w, h), jitter(palette[0]))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, size=2))
        colour = jitter(palette[int(rng.integers(1, len(palette)))])
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 6)))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _audio(rng: np.random.Generator, cat: int, sr: int) -> np.ndarray:
    """A 1-4 s major chord whose root pitch rises with the category index, enveloped, with noise."""
    t = np.arange(int(sr * rng.uniform(1.0, 4.0))) / sr
    f0 = 110.0 * 2 ** (cat / 4)
    chord = sum(np.sin(2 * np.pi * f0 * ratio * t + rng.uniform(0, 2 * np.pi)) for ratio in (1.0, 1.25, 1.5))
    envelope = np.minimum(t / 0.05, 1.0) * np.exp(-t * rng.uniform(0.3, 1.5))
    return (0.25 * chord * envelope + rng.normal(0, 0.01, size=t.size)).astype(np.float32)


def _catalog(rng: np.random.Generator, n_items: int, out: Path) -> tuple[pa.Table, np.ndarray]:
    """Write the media files and return the catalog table plus each item's category index."""
    images, audio = out / "media" / "images", out / "media" / "audio"
    images.mkdir(parents=True)
    audio.mkdir(parents=True)
    cats = rng.permutation(np.arange(n_items) % len(NAMES))
    centroids = rng.normal(size=(len(NAMES), FEATURE_DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    image_kind = rng.choice(["jpeg", "inline", "png", "none"], size=n_items, p=[0.45, 0.25, 0.10, 0.20])
    has_audio = rng.random(n_items) < 0.4
    offsets = rng.integers(0, int((CATALOG_END - CATALOG_START) / np.timedelta64(1, "us")), size=n_items)
    rows: dict[str, list] = {name: [] for name in CATALOG_SCHEMA.names}
    n_inline_images = n_audio = 0
    for i, cat in enumerate(int(c) for c in cats):
        item_id = f"item-{i + 1:04d}"
        title, description, tags = _text(rng, cat, i + 1)
        image_uri = image_bytes = audio_uri = audio_bytes = None
        if image_kind[i] != "none":
            img = _image(rng, cat)
            if image_kind[i] == "jpeg":
                img.save(images / f"{item_id}.jpg", format="JPEG", quality=85)
                image_uri = f"../media/images/{item_id}.jpg"
            elif image_kind[i] == "png":
                img.save(images / f"{item_id}.png", format="PNG")
                image_uri = f"../media/images/{item_id}.png"
            else:  # the first few inline images are RGBA / greyscale to exercise mode conversion
                mode = {0: "RGBA", 1: "RGBA", 2: "L", 3: "L"}.get(n_inline_images, "RGB")
                buf = io.BytesIO()
                img.convert(mode).save(buf, format="PNG")
                image_bytes = buf.getvalue()
                n_inline_images += 1
        if has_audio[i]:
            kind = ["wav", "ogg16", "wav", "ogg22"][n_audio % 4]
            if kind == "wav" and n_audio < 10:  # the first five WAVs travel inline
                buf = io.BytesIO()
                sf.write(buf, _audio(rng, cat, 16000), 16000, format="WAV", subtype="PCM_16")
                audio_bytes = buf.getvalue()
            elif kind == "wav":
                sf.write(audio / f"{item_id}.wav", _audio(rng, cat, 16000), 16000, format="WAV", subtype="PCM_16")
                audio_uri = f"../media/audio/{item_id}.wav"
            else:
                sr = 16000 if kind == "ogg16" else 22050
                sf.write(audio / f"{item_id}.ogg", _audio(rng, cat, sr), sr, format="OGG", subtype="VORBIS")
                audio_uri = f"../media/audio/{item_id}.ogg"
            n_audio += 1
        features = None
        if rng.random() >= 0.1:
            features = (centroids[cat] + rng.normal(0, 0.3, size=FEATURE_DIM)).astype(np.float32)
        for key, value in zip(CATALOG_SCHEMA.names, (
                item_id, title, description, tags, image_uri, image_bytes, audio_uri, audio_bytes, features,
                int(offsets[i]) + int(CATALOG_START.astype(np.int64)))):
            rows[key].append(value)
    return pa.Table.from_pydict(rows, schema=CATALOG_SCHEMA), cats


def _interactions(rng: np.random.Generator, cats: np.ndarray, n_users: int) -> pa.Table:
    """Users draw 80% of their items from one or two favourite categories, skewed by item popularity."""
    n_items = len(cats)
    popularity = 1.0 / (rng.permutation(n_items) + 5.0)
    span = int((EVENTS_END - EVENTS_START) / np.timedelta64(1, "s"))
    start = int(EVENTS_START.astype(np.int64))
    rows: dict[str, list] = {name: [] for name in INTERACTIONS_SCHEMA.names}
    for u in range(n_users):
        favourites = rng.choice(len(NAMES), size=int(rng.integers(1, 3)), replace=False)
        liked = np.isin(cats, favourites)
        n = min(int(rng.integers(8, 41)), n_items)
        seen = np.zeros(n_items, dtype=bool)
        times = np.sort(rng.choice(span, size=n, replace=False)) + start
        for ts in times:
            pool = liked if rng.random() < 0.8 else np.ones(n_items, dtype=bool)
            weights = popularity * (pool & ~seen)
            if weights.sum() == 0:  # favourite categories exhausted
                weights = popularity * ~seen
            item = int(rng.choice(n_items, p=weights / weights.sum()))
            seen[item] = True
            rating = rng.integers(3, 6) if liked[item] else rng.integers(1, 4)
            rows["user_id"].append(f"user-{u + 1:04d}")
            rows["item_id"].append(f"item-{item + 1:04d}")
            rows["timestamp"].append(int(ts))
            rows["event"].append(str(rng.choice(["view", "click", "purchase"], p=[0.6, 0.3, 0.1])))
            rows["weight"].append(float(rating))
    return pa.Table.from_pydict(rows, schema=INTERACTIONS_SCHEMA)


def generate(out_dir: str | Path, n_items: int = 300, n_users: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write the demo catalog, media and interactions under ``out_dir``, replacing any earlier run."""
    out = Path(out_dir)
    for sub in ("catalog", "media", "interactions"):  # stale media from another seed would linger
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "catalog").mkdir(parents=True)
    (out / "interactions").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    catalog, cats = _catalog(rng, n_items, out)
    paths = {"catalog": out / "catalog" / "catalog.parquet",
             "interactions": out / "interactions" / "interactions.parquet", "root": out}
    pq.write_table(catalog, paths["catalog"])
    pq.write_table(_interactions(rng, cats, n_users), paths["interactions"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate(args.out, args.items, args.users, args.seed)
    print(paths["catalog"])
    print(paths["interactions"])


if __name__ == "__main__":
    main()

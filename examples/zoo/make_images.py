"""Writes a small image folder for the timm example: 48x48 PNGs of three shapes on dark noise.

    python examples/zoo/make_images.py            # -> examples/zoo/images/{train,val}/{disk,ring,square}/*.png

Each image is one bright shape (a filled disk, a ring or a filled square) of random size, position
and colour on uniform noise; 150 training and 40 validation images per class (seeded: the same
files on every machine). The layout is torchvision's ImageFolder, as the built-in `imagefolder`
dataset reads it.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disk", "ring", "square")


def draw(shape: str, rng: np.random.Generator, size: int) -> np.ndarray:
    pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    radius = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(c) for c in rng.integers(radius, size - radius, 2))
    distance = np.hypot(xx - cx, yy - cy)
    if shape == "disk":
        inside = distance <= radius
    elif shape == "ring":
        inside = (distance <= radius) & (distance >= radius * 0.6)
    else:
        inside = (abs(xx - cx) <= radius * 0.85) & (abs(yy - cy) <= radius * 0.85)
    pixels[inside] = rng.integers(140, 256, 3, dtype=np.uint8)
    return pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "images"))
    parser.add_argument("--train", type=int, default=150, help="training images per class")
    parser.add_argument("--val", type=int, default=40, help="validation images per class")
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for split, count in (("train", args.train), ("val", args.val)):
        for shape in CLASSES:
            folder = Path(args.out) / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw(shape, rng, args.size)).save(folder / f"{i:04d}.png")
    print(f"wrote {len(CLASSES) * (args.train + args.val)} images to {args.out}")


if __name__ == "__main__":
    main()

"""Lay out the real photos that scikit-image, scikit-learn and matplotlib ship as an ImageFolder
tree, for ``jobs/configs/photos-efficientnet-lite0.yaml``: nothing is downloaded.

    python -m jobs.examples.photos photos      # photos/<subject>/<name>.png, 24 photos

The folders group the photos by subject; they are not ImageNet's classes (the config groups the
images by the model's prediction).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

#: subject -> scikit-image photos (all ship inside scikit-image's wheel)
SKIMAGE = {
    "animals": ["chelsea"],
    "objects": ["coffee", "clock", "coins", "rocket", "colorwheel", "logo"],
    "people": ["astronaut", "camera"],
    "science": ["hubble_deep_field", "immunohistochemistry", "moon", "retina"],
    "textures": ["brick", "grass", "gravel"],
    "text": ["page", "text"],
    "vehicles": ["stereo_motorcycle"],
}


def photos() -> dict[str, dict[str, np.ndarray]]:
    """subject -> {name: (H, W, 3) or (H, W) uint8 image}."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    found: dict[str, dict[str, np.ndarray]] = {}
    for subject, names in SKIMAGE.items():
        for name in names:
            image = getattr(skimage.data, name)()
            found.setdefault(subject, {})[name] = image[0] if isinstance(image, tuple) else image
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        found.setdefault("scenes" if "china" in path else "plants", {})[Path(path).stem] = image
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    found["people"]["grace_hopper"] = np.asarray(Image.open(mpl / "grace_hopper.jpg").convert("RGB"))
    found["objects"]["present"] = np.asarray(Image.open(mpl / "Minduka_Present_Blue_Pack.png").convert("RGB"))
    found["vehicles"]["stereo_motorcycle_right"] = skimage.data.stereo_motorcycle()[1]
    return found


def write(root: str | os.PathLike[str]) -> int:
    """Write every photo as ``root/<subject>/<name>.png``; returns how many."""
    count = 0
    for subject, images in photos().items():
        (Path(root) / subject).mkdir(parents=True, exist_ok=True)
        for name, image in images.items():
            Image.fromarray(np.asarray(image)).convert("RGB").save(Path(root) / subject / f"{name}.png")
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to lay the photos out in (created)")
    args = parser.parse_args(argv)
    print(f"{write(args.root)} photos in {args.root}")


if __name__ == "__main__":
    main()

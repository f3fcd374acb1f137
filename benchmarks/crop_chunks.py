"""The atlas's crop shards by inner chunk size: one unit's shard written, and scattered rows read
(as the report and ``show`` read a concept's members), for chunks of 1 crop (what a prime number
of rows per unit gave before the rows were rounded to whole chunks) up to 64. Random crops of
the atlas's default size; every size measured side by side in one run, printed as seconds and
as ratios to the 16-crop chunk the store uses.

    python benchmarks/crop_chunks.py [--rows 3511 --crop 48 --reads 800]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import zarr
from zarr.codecs import ZstdCodec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3511, help="crops of one unit (the embedded default's: 3,511)")
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--reads", type=int, default=800, help="scattered rows read over two units' shards")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # crops that compress like real ones: smooth blobs, not noise
    base = rng.integers(0, 255, (args.rows, 6, 6, 3), dtype=np.uint8)
    crops = np.repeat(np.repeat(base, args.crop // 6, axis=1), args.crop // 6, axis=2)
    found = {}
    with tempfile.TemporaryDirectory() as root:
        for inner in (1, 8, 16, 32, 64):
            cap = -(-args.rows // inner) * inner  # whole chunks per shard
            shard = np.zeros((cap, args.crop, args.crop, 3), np.uint8)
            shard[: args.rows] = crops
            array = zarr.create_array(store=f"{root}/c{inner}.zarr", shape=(2 * cap, args.crop, args.crop, 3),
                                      chunks=(inner, args.crop, args.crop, 3), shards=(cap, args.crop, args.crop, 3),
                                      dtype="uint8", compressors=ZstdCodec(level=1))
            started = time.perf_counter()
            array[:cap] = shard
            write = time.perf_counter() - started
            array[cap:] = shard
            rows = np.sort(rng.choice(2 * cap, args.reads, replace=False))
            started = time.perf_counter()
            array.get_orthogonal_selection((rows,))
            found[inner] = (write, time.perf_counter() - started)
    print(f"{args.rows} crops of {args.crop} px per shard; {args.reads} scattered rows read")
    print(f"{'crops/chunk':>12} {'write s':>9} {'read s':>9} {'write x16':>10} {'read x16':>9}")
    for inner, (write, read) in found.items():
        print(f"{inner:>12} {write:>9.3f} {read:>9.3f} {write / found[16][0]:>10.1f} {read / found[16][1]:>9.1f}")


if __name__ == "__main__":
    main()

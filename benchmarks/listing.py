"""Indexing a dataset of 50,000 images: the listing of an ImageFolder prefix in object storage
(S3's API, moto's server on loopback) against the walk of the same tree on local disk, side by
side. The files are empty: only names are listed.

    python benchmarks/listing.py [--images 50000 --classes 1000]

Needs ``moto[server]`` and s3fs (both in the dev extra). moto answers from memory on this machine,
so the S3 figure is the cost of the API's pages (1,000 keys each) and of s3fs, not of a network.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args(argv)
    port = _free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        import fsspec

        from gig_dist.config import load_config
        from gig_dist.data.sources import build_index

        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        names = [(f"n{c:08d}", f"{c:04d}_{i:05d}.JPEG") for i in range(args.images) for c in [i % args.classes]]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "val"
            for folder, name in names:
                (root / folder).mkdir(parents=True, exist_ok=True)
                (root / folder / name).touch()
            fs = fsspec.filesystem("s3")
            fs.mkdir("listing")
            fs.pipe({f"listing/val/{folder}/{name}": b"" for folder, name in names})
            seconds = {}
            for where, path in (("local walk", str(root)), ("S3 listing", "s3://listing/val")):
                config = load_config(None, ["dataset.kind=imagefolder", f"dataset.path={path}"])
                fs.invalidate_cache()
                started = time.perf_counter()
                index = build_index(config.dataset)
                seconds[where] = time.perf_counter() - started
                assert len(index) == args.images and len(index.class_names) == args.classes
        print(f"indexing {args.images:,} images in {args.classes} class folders; {platform.node()}, "
              f"{time.strftime('%Y-%m-%d')}")
        for where, value in seconds.items():
            print(f"  {where:<11} {value:6.2f} s  ({args.images / value:,.0f} images/s)")
        print(f"  S3 / local  {seconds['S3 listing'] / seconds['local walk']:6.2f}x")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()

"""Run the whole pipeline from a config; the entrypoint of `ray job submit`:

    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/imagenet-resnet50.yaml --out s3://bucket/run.zarr
"""

import sys

from gig_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

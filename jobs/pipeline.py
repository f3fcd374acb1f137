"""Ray job entrypoint for the whole pipeline. Thin: parse a config, run the pipeline on Ray.

    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/imagenet-resnet50.yaml --out s3://bucket/run.zarr

Takes the options of `gig-dist run`. The runtime is Ray, on the job's own cluster (RAY_ADDRESS),
whatever the config file says; a later `-o runtime.kind=local` still wins.
"""

import sys

from gig_dist.cli import main


def job_argv(argv: list[str]) -> list[str]:
    return ["run", "-o", "runtime.kind=ray", *argv]


if __name__ == "__main__":
    sys.exit(main(job_argv(sys.argv[1:])))

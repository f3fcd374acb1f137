"""Validate a RayJob manifest against KubeRay's own CRD schema: the ``v1`` OpenAPI schema of
``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` from ray-project/kuberay, which you download
(it is not shipped here):

    curl -LO https://raw.githubusercontent.com/ray-project/kuberay/v1.4.2/ray-operator/config/crd/bases/ray.io_rayjobs.yaml
    python -m jobs.k8s.validate ray.io_rayjobs.yaml jobs/k8s/rayjob.yaml

The CRD's structural schema is JSON Schema in OpenAPI's dialect: ``x-kubernetes-*`` keys are
left to the API server, ``int-or-string`` quantities are either. Exits 1 naming every violation.
"""

from __future__ import annotations

import argparse
import sys

import yaml


def crd_schema(crd: dict, version: str = "v1") -> dict:
    for found in crd["spec"]["versions"]:
        if found["name"] == version:
            return found["schema"]["openAPIV3Schema"]
    raise SystemExit(f"the CRD has no version {version}")


def main(argv: list[str] | None = None) -> int:
    import jsonschema

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd")
    parser.add_argument("manifest")
    args = parser.parse_args(argv)
    with open(args.crd) as file:
        schema = crd_schema(yaml.safe_load(file))
    with open(args.manifest) as file:
        manifest = yaml.safe_load(file)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    for error in errors:
        print(f"{'.'.join(str(p) for p in error.path) or '<root>'}: {error.message}")
    print(f"{args.manifest}: {'valid' if not errors else f'{len(errors)} violation(s)'} against {args.crd}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""The docs site builds strictly (a broken link or anchor fails), with its configuration, CLI and
code references generated from the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_docs_site_builds_strictly_with_generated_references(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    # generated from the schema: a key, its default and its comment
    assert "decompose.lambda_rel" in config and "gig.steps" in config and "midpoint" in config
    assert "concepts.params" in config
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "gig-dist evaluate" in cli and "--match" in cli and "gig-dist sweep" in cli
    code = (tmp_path / "site" / "reference" / "code" / "index.html").read_text()
    assert "gig_dist/stages/driver.py" in code


def test_the_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    import re

    for target in re.findall(r"\]\(([^)#]+)", text):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which is not in the repository"

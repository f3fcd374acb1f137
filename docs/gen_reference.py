"""MkDocs hook: the configuration, CLI and code-layout references, generated at build time from
the schema (its ``#:`` comments and defaults), the argument parser and the modules' docstrings,
so that they cannot drift from the code."""

from __future__ import annotations

import ast
import json
import tempfile
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gig_dist"


def _comments(path: Path) -> dict[tuple[str, str], str]:
    """(class, field) -> the ``#:`` comment lines just above the field in ``path``."""
    lines = path.read_text().splitlines()
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    text, row = [], item.lineno - 2
                    while row >= 0 and lines[row].strip().startswith("#:"):
                        text.insert(0, lines[row].strip()[2:].strip())
                        row -= 1
                    found[(node.name, item.target.id)] = " ".join(text)
    return found


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return ""
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def config_reference() -> str:
    from pydantic import BaseModel

    from gig_dist.config import Config

    comments = {**_comments(PACKAGE / "config.py"), **_comments(PACKAGE / "sections.py")}
    out = ["# Configuration reference", "",
           "Generated from the schema (`gig_dist/config.py`, `gig_dist/sections.py`) at every docs build. Every key "
           "has a default, so an empty config is the embedded toy-world run. Set a key in a YAML file "
           "(`gig-dist run --config FILE`) or on the command line (`-o section.key=value`, parsed as YAML); "
           "`gig-dist config` prints the whole resolved config. Unknown keys are refused with the closest valid one.",
           ""]

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, nested = [], []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                nested.append((f"{prefix}{name}", annotation))
                continue
            kind = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            text = comments.get((model.__name__, name), "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{kind}` | {_default(field)} | {text} |".replace("`|", "`\\|"))
        if rows:
            out.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", (model.__doc__ or "").strip(), "",
                        "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for name, child in nested:
            section(child, f"{name}.")

    section(Config, "")
    return "\n".join(out)


def cli_reference() -> str:
    from gig_dist.cli import build_parser

    parser = build_parser()
    parser.prog = "gig-dist"
    out = ["# Command-line reference", "", "Generated from the argument parser (`gig_dist/cli.py`) at every docs build.",
           "", "```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._subparsers._group_actions:  # the sub-commands, in the parser's order
        for name, sub in action.choices.items():
            sub.prog = f"gig-dist {name}"
            out += [f"## `gig-dist {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def code_reference() -> str:
    out = ["# Code layout", "",
           "Generated from each module's docstring at every docs build; the layers, lowest first, are checked by "
           "`tests/test_layers.py` (no import circle, no import from a lower layer to a higher one): settings and "
           "config sections -> config, kernels (pure math), toy world -> data -> models -> store (the only code "
           "that knows the Zarr layout) -> stages (base, shared helpers, stages, registry, driver) -> runtime (the "
           "only code that imports Ray) -> pipeline -> read, plan, sweep -> report -> CLI.", "",
           "| module | what it is |", "|---|---|"]
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")
        out.append(f"| `{path.relative_to(ROOT)}` | {first} |")
    return "\n".join(out) + "\n"


PAGES = {"reference/config.md": config_reference, "reference/cli.md": cli_reference,
         "reference/code.md": code_reference}


def on_files(files, config):
    """Add the generated pages to the site (they are not in ``docs/``)."""
    out = Path(tempfile.mkdtemp(prefix="gig-dist-docs-"))
    for uri, make in PAGES.items():
        path = out / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        files.append(File(uri, str(out), config["site_dir"], config["use_directory_urls"]))
    return files

"""mkdocs hooks: pages generated at build time from the repository (offline, no execution).

* ``api.md``: one mkdocstrings block per name of ``singd_functional.__all__`` (read from
  the package's ``__init__.py`` with ``ast``, so adding a public name adds its entry).
* ``notebooks/<name>.md``: each ``notebooks/*.ipynb`` rendered as markdown, listed in
  the nav's "Notebooks" section (markdown cells
  as they are, code cells as Python blocks; the notebooks are committed without outputs,
  so none are shown). Links to ``../docs/<page>`` become links between site pages;
  links to other repository files become plain code spans (the site holds no copy).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "singd_functional"

# groups of the API page; names of __all__ not listed here go under "Other"
API_GROUPS = {
    "The drop-in optimizer": ["SINGD"],
    "The functional core": ["singd", "HyperParams", "SINGDState"],
    "Layers and capture": ["find_layers", "LayerInfo", "describe", "LayerKind",
                           "register_layer_kind", "make_capture", "LayerCapture"],
    "SINGD's stages": ["scale_by_kronecker_factors", "KroneckerState", "LayerStatistics",
                       "Factors"],
    "Composition": ["GradientTransformation", "apply_updates", "chain", "masked",
                    "partition", "PYTREE_NAMESPACE"],
    "First-order transforms": ["add_decayed_weights", "trace", "TraceState",
                               "scale_by_learning_rate", "clip_by_global_norm",
                               "scale_by_schedule", "sgd", "adamw", "AdamWState"],
    "Sweeps and compiled steps": ["make_sweep", "grid", "Sweep", "SweepState", "make_step",
                                  "Step"],
    "Structures": ["structures"],
}


def public_names(init: Path) -> list[str]:
    """The names listed in ``__all__`` of a module file, in order."""
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    raise ValueError(f"{init} has no __all__")


def api_page() -> str:
    names = public_names(ROOT / PACKAGE / "__init__.py")
    listed = {n for group in API_GROUPS.values() for n in group}
    groups = {g: [n for n in members if n in names] for g, members in API_GROUPS.items()}
    groups["Other"] = [n for n in names if n not in listed]
    lines = [
        "# API reference",
        "",
        f"Generated from the docstrings of `{PACKAGE}.__all__` (import it as "
        "`import singd_functional as sf`). The equations behind the arguments are on the "
        "[algorithm page](algorithm.md).",
        "",
    ]
    for group, members in groups.items():
        if not members:
            continue
        lines += [f"## {group}", ""]
        for name in members:
            lines += [f"::: {PACKAGE}.{name}", ""]
            if name == "structures":
                struct_names = public_names(ROOT / PACKAGE / "structures" / "__init__.py")
                lines += ["    options:", "      members:"]
                lines += [f"        - {n}" for n in struct_names] + [""]
    return "\n".join(lines)


def notebook_page(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    parts = [
        f"<!-- generated from notebooks/{path.name} by docs/hooks.py; edit "
        "notebooks/build_notebooks.py -->",
        f"*Notebook `notebooks/{path.name}`; run it with Jupyter to see the outputs.*",
    ]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(_plain_repo_links(cell.source))
        elif cell.cell_type == "code":
            parts.append(f"```python\n{cell.source}\n```")
    return "\n\n".join(parts) + "\n"


def _plain_repo_links(text: str) -> str:
    """Site links for docs pages and notebooks; other repository files as code spans."""

    def one(match: re.Match[str]) -> str:
        label, target = match[1], match[2]
        if re.match(r"https?://|#", target):
            return match[0]
        if target.startswith("../docs/"):
            return f"[{label}](../{target[len('../docs/'):]})"
        if target.endswith(".ipynb") and "/" not in target:
            return f"[{label}]({target[: -len('.ipynb')]}.md)"
        return f"{label} (`{target.removeprefix('../')}` in the repository)"

    return re.sub(r"\[([^\]]*)\]\(([^)\s]+)\)", one, text)


def notebook_index() -> str:
    readme = (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")
    return _plain_repo_links(readme)


def on_config(config):
    """The "Notebooks" section of the nav lists every notebooks/*.ipynb (a new one appears
    without editing mkdocs.yml)."""
    pages = ["notebooks/index.md"] + [
        f"notebooks/{nb.stem}.md" for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
    ]
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Notebooks" in entry:
            entry["Notebooks"] = pages
    return config


def on_files(files: Files, config) -> Files:
    generated = {"api.md": api_page(), "notebooks/index.md": notebook_index()}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        generated[f"notebooks/{nb.stem}.md"] = notebook_page(nb)
    for uri, content in generated.items():
        files.append(File.generated(config, uri, content=content))
    return files

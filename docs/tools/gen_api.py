"""The API reference: one page per public module of coron_dask/, found by walking the package
tree at build time (mkdocs-gen-files), so that a module added, split or renamed appears by
itself. Its navigation is written as reference/SUMMARY.md (mkdocs-literate-nav)."""

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "coron_dask"

nav = mkdocs_gen_files.Nav()
for path in sorted(PACKAGE.rglob("*.py")):
    module = path.relative_to(ROOT).with_suffix("")
    parts = list(module.parts)
    if parts[-1] == "__main__" or any(part.startswith("_") for part in parts[:-1]):
        continue
    if parts[-1] == "__init__":
        # a package's page: its docstring; its names are documented where they are defined
        parts = parts[:-1]
        page = Path("reference", *parts[1:], "index.md") if len(parts) > 1 else None
        page = page or Path("reference", "index.md")
        options = "    options:\n      members: false\n"
    elif parts[-1].startswith("_"):
        continue
    else:
        page = Path("reference", *parts[1:]).with_suffix(".md")
        options = ""
    nav[tuple(parts[1:]) or ("coron_dask",)] = page.relative_to("reference").as_posix()
    with mkdocs_gen_files.open(page, "w") as out:
        out.write(f"::: {'.'.join(parts)}\n{options}")
    mkdocs_gen_files.set_edit_path(page, path.relative_to(ROOT))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())

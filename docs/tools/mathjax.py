"""MkDocs hook: MathJax 3 (from the django-static-mathjax wheel, which is MathJax's files and
nothing else) copied into the site under assets/mathjax/, so the science pages' formulas
render with no CDN, on a machine without network too."""

from importlib.resources import files as package_files
from pathlib import Path

from mkdocs.structure.files import File, Files

#: What tex-chtml.js loads: itself, the TeX extensions it may autoload, the CHTML fonts.
PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2")


def on_files(files: Files, config) -> Files:
    root = Path(str(package_files("mathjax") / "static" / "mathjax" / "es5"))
    for part in PARTS:
        source = root / part
        for path in [source] if source.is_file() else sorted(source.rglob("*")):
            if path.is_file():
                uri = f"assets/mathjax/{path.relative_to(root).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files

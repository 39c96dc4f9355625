"""MkDocs hooks: the benchmark results the pages cite are published with the site.

The pages link results as `../benchmarks/results/NAME`, a path that works where the Markdown is read as
files (GitHub, an editor); the site carries those files under `results/` and the links are pointed there.
A link to a results file that does not exist still fails `mkdocs build --strict`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        if path.is_file():
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    return markdown.replace("](../benchmarks/results/", "](results/")

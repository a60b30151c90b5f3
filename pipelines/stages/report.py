"""What a finished `dvc repro` produced: per task the winner, its test metrics, where to look next.

`python -m pipelines.stages.report` prints the summary; `--markdown PATH` also writes the
results table (per task and family, from the pipeline's own outputs) as Markdown,
and `--readme` replaces the table between the RESULTS markers in README.md (pipelines/reporting.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.reporting import collect, replace_readme_table, results_markdown, summary_text


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the results table here")
    parser.add_argument("--readme", action="store_true", help="update the results table in README.md")
    args = parser.parse_args()
    params = load_params()
    results = collect(Path.cwd())
    uri = os.environ.get("MLFLOW_TRACKING_URI", params.mlflow.tracking_uri)
    print(summary_text(results, uri, params.serve.host, params.serve.port))
    table = results_markdown(results)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.readme:
        replace_readme_table(Path("README.md"), table)


if __name__ == "__main__":
    main()

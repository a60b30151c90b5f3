"""Stage `package`: trained models into the BentoML model store, ONNX exports, and the Bento.

`python -m pipelines.stages.package` stores each task's champion, `artifacts/champion/<task>/` (what
the promote stage chose, checked against reports/promotion/<task>.json), as BentoML model `convforge-<task>`,
builds the Bento from services/bentofile.yaml, and writes
artifacts/bento/convforge.bento and artifacts/bento/bento.json (pipelines/packaging.py).
The store is `<project>/.bentoml` unless BENTOML_HOME is set.
"""

from __future__ import annotations

import sys

import pipelines.runtime  # noqa: F401  (first: telemetry off before the stack is imported)
from pipelines.errors import stage_entry
from pipelines.packaging import ROOT, package
from pipelines.params import load_params
from services.catalog import use_project_store


@stage_entry
def main() -> None:
    params = load_params(ROOT / "params.yaml")  # fail early on a bad params.yaml, as every stage does
    use_project_store(ROOT)
    package(ROOT / "artifacts" / "champion", ROOT / "reports" / "promotion", ROOT / "artifacts" / "bento",
            serve=params.serve)


if __name__ == "__main__":
    sys.exit(main())

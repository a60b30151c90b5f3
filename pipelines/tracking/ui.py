"""Where to click in MLflow's UI: the lines `make ui` prints before it starts `mlflow ui`.

MLflow 3.17's UI opens in its GenAI view, whatever the experiment's kind; the `workflowType=machine_learning`
query of a link opens the "Model training" view (runs, logged models, the registry) instead.
`python -m pipelines.tracking.ui [--url http://127.0.0.1:5000]` prints them; `--print-uri` prints the store they
are read from (MLFLOW_TRACKING_URI, else params.yaml's, resolved), the one `make ui` serves.
"""

from __future__ import annotations

import argparse

from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.tracking.store import client, store_exists, store_uri, use_store

TRAINING_VIEW = "workflowType=machine_learning"


def ui_lines(url: str, experiment: str, experiment_id: str | None) -> list[str]:
    """What to open, and what each page holds, for experiment `experiment` (id None: not created yet)."""
    if experiment_id is None:
        return [f"MLflow UI: {url}/#/experiments?{TRAINING_VIEW}  (no experiment {experiment!r} yet: run "
                "`make repro` first)"]
    page = f"{url}/#/experiments/{experiment_id}"
    return [
        f"MLflow UI, experiment {experiment!r} (\"Model training\" view):",
        f"  runs    {page}/runs?{TRAINING_VIEW}",
        "          train-<task>-<family>: opens on Overview (params, last metrics); its Model metrics tab has the",
        "          learning curves, per-class values in their own sections (per_class/<metric>);",
        "          search-<task>: one child run per trial (expand the row)",
        f"  models  {page}/models?{TRAINING_VIEW}",
        "          one logged model per training, <task>-<family>, with its best_val_* and test_* columns",
        f"  registry {url}/#/models",
        "          <prefix>-<task>: a described version per training; the alias `champion` is the served one",
    ]


def store_lines(uri: str, url: str, experiment: str) -> list[str]:
    """The pages of the store at `uri`, read without creating it: a store not made yet gets one line."""
    if not store_exists(uri):
        return [f"no MLflow store at {uri} yet: run `make repro` first"]
    use_store(uri)
    found = client().get_experiment_by_name(experiment)
    return ui_lines(url, experiment, found and found.experiment_id)


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="where `mlflow ui` listens")
    parser.add_argument("--print-uri", action="store_true", help="print the store's URI only")
    args = parser.parse_args()
    params = load_params()
    uri = store_uri(params.mlflow)
    if args.print_uri:
        print(uri)
        return
    print("\n".join(store_lines(uri, args.url.rstrip("/"), params.mlflow.experiment)))


if __name__ == "__main__":
    main()

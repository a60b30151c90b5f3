"""Every MLflow call of ConvForge: the store, runs, logged models, the registry, and the search's runs.

The store is `mlflow.tracking_uri` of params.yaml (`sqlite:///mlflow.db`, a relative path taken
from the project's main workspace, `workspace_root()`, also in a `dvc exp run --temp` copy) unless
`MLFLOW_TRACKING_URI` is set. Every tag name is in `tags`. The Ray Tune callback that logs trials is
`pipelines.tracking.trial_logger.TrialLogger` (imported on its own: it needs Ray). No other module of
the project imports MLflow.
"""

from pipelines.tracking import tags
from pipelines.tracking.lineage import code_hash, data_hash
from pipelines.tracking.registry import (LoggedVersion, ModelCard, RegisteredVersion, Registration, champion,
                                         download_model_dir, log_model, model_version, pip_requirements,
                                         pyfunc_example, register_model, registered_name, set_champion, tag_version)
from pipelines.tracking.runs import (add_to_run, end_run, flatten, git_commit, log_artifacts, log_dataset,
                                     log_metrics, log_params, logged_models, sanitize, set_tags,
                                     system_metrics_available, training_run)
from pipelines.tracking.search_runs import (close_trial_runs, end_open_trials, end_search, log_search_result,
                                            mark_complete, open_search, trial_run)
from pipelines.tracking.store import (configure, ensure_experiment, resolve_uri, run_exists, store_uri, tracking_uri,
                                      use_store, workspace_root)

__all__ = ["LoggedVersion", "ModelCard", "RegisteredVersion", "Registration", "add_to_run", "champion",
           "close_trial_runs", "code_hash", "configure", "data_hash", "download_model_dir", "end_open_trials",
           "end_run", "end_search", "ensure_experiment", "flatten", "git_commit", "log_artifacts", "log_dataset",
           "log_metrics", "log_model", "log_params", "log_search_result", "logged_models", "mark_complete",
           "model_version", "open_search", "pip_requirements", "pyfunc_example", "register_model", "registered_name",
           "resolve_uri", "run_exists", "sanitize", "set_champion", "set_tags", "store_uri",
           "system_metrics_available", "tag_version", "tags", "tracking_uri", "training_run", "trial_run", "use_store",
           "workspace_root"]

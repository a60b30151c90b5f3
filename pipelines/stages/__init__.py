"""The stage entry modules: `python -m pipelines.stages.<stage> [task]`, one per `dvc.yaml` stage."""

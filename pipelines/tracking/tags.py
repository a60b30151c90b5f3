"""Every tag and alias name ConvForge writes to MLflow, in one place (queries and writers share them)."""

# MLflow's own tags: the UI nests a run under the run it names, and shows each run's source and commit
# (mlflow.start_run sets the last three itself; runs the search creates through the client get them from us).
PARENT_RUN = "mlflow.parentRunId"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"

# MLflow's experiment tag for the UI's kind of experiment: "Model training" (its default is the GenAI view).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

# Runs of every stage
TASK = "convforge.task"
STAGE = "convforge.stage"
FAMILY = "convforge.family"
# What the commit tag leaves out (also on registered versions): whether params.yaml or the code differed from the
# commit ("true"/"false"; `dvc exp run` applies its params there), and the DVC experiment that ran it
GIT_DIRTY = "convforge.git_dirty"
DVC_EXP = "convforge.dvc_exp"

# A search's parent run
SEARCH_KEY = "convforge.search_key"
SEARCH_STATE = "convforge.search_state"
WINNER_FAMILY = "convforge.winner.family"
WINNER_TRIAL_ID = "convforge.winner.trial_id"
WINNER_RUN_ID = "convforge.winner.run_id"

# A search's child runs, one per Ray Tune trial
TRIAL_ID = "convforge.trial_id"
TRIAL_STATE = "convforge.trial_state"
NODE_ID = "convforge.node_id"
NODE_IP = "convforge.node_ip"
DEVICE = "convforge.device"  # the resolved device line (also of training runs)
RETRIES = "convforge.retries"
ERROR = "convforge.error"
WINNER = "convforge.winner"

# A training run (CHAMPION and PROMOTION are set by the promote stage, once the run's model is tested)
REGISTERED_VERSION = "convforge.registered_version"
CHAMPION = "convforge.champion"
PROMOTION = "convforge.promotion"

# Registered model versions, and the alias of each registered model's best version
VERSION_METRIC = "metric"
VERSION_SCORE = "score"
VERSION_DATA_HASH = "data_hash"
VERSION_WEIGHTS_SHA256 = "weights_sha256"  # of model.safetensors, checked before the champion is served
# Set by the promote stage: the test split's hash, the gate's verdict, and each `test_*` metric as its own tag
VERSION_TEST_DATA_HASH = "data_hash.test"
VERSION_GATE = "gate"
TEST_METRIC_PREFIX = "test_"
CHAMPION_ALIAS = "champion"

# A run's dataset input
DATASET_HASH = "data_hash"
REPLAY_OF = "convforge.replay_of"  # a replay run: the run id it rebuilt (python -m pipelines.replay)

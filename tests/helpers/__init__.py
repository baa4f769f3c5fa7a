"""Test tooling that is not part of the installed package: the reader of offline W&B run files
(`helpers.wandb_offline`) and the local SLURM cluster (`helpers.slurm`, which loads the user
script `experiments/slurm/local_cluster.py`). Tests import them as `from helpers.<module> import ...`
(pytest puts `tests/` on `sys.path`, as for `conftest`)."""

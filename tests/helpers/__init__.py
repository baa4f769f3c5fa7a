"""Test tooling that is not part of the installed package: independent reference implementations
(`helpers.reference_nets`; for the diffusion nets `helpers.reference_diffusion` and `helpers.reference_adm`),
the reader of offline W&B run files (`helpers.wandb_offline`), the local SLURM cluster (`helpers.slurm`,
which loads the user script `experiments/slurm/local_cluster.py`) and a user's own extensions
(`helpers.toy_plugins`). Tests import them as `from helpers.<module> import ...` (pytest puts `tests/` on
`sys.path`, as for `conftest`)."""

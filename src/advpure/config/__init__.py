"""Config: the schema (`schema`), composition and validation with OmegaConf (`compose`), and the
`--help` text generated from them (`help`)."""

from advpure.config.compose import (  # noqa: F401
    Config,
    attack_eps_step,
    defense_option,
    experiment_names,
    fingerprint,
    group_options,
    groups,
    load,
    root_schema,
    to_dict,
    to_yaml,
    typed_block,
    validate,
)

"""Leaves every layer may import: errors, keyed random streams, registries, parameter schemas, safe
file loading, and the process settings a command makes once (`advpure.core.runtime`)."""

"""The commands (`train`, `benchmark`, `certify`) and their plumbing: plan, weights on disk, training
stages, the benchmark and certification test loops, trainer, loggers, reports. No command imports
another; what two commands share lives in a plumbing module here."""

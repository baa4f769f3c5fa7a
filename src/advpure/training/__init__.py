"""Training algorithms with their LightningModules: losses (DSM, ML), EMA, MCMC, and the classifier,
score-net and EBM modules. Network kinds (`advpure.kinds`) name these as their training stages."""

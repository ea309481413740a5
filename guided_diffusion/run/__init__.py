"""The run machinery of the scripts: the sampling pipeline (flags -> networks -> sampler -> output),
checkpoints, sharded output, network batching, errors across ranks, speed switches, paper cells."""

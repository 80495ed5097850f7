"""What a run stands on: the training loop, checkpoints and resume, the run lock, several processes, sharding, the log, compiling, the optimizer."""

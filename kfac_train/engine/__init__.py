"""The training engine shared by every workload: loop, checkpoints, precision, run outputs."""

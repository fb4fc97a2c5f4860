"""Training stage (workstation): datasets, the paper's recipes, FP32 checkpoints. Needs spine-edge[train]."""

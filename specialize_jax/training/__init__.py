"""Training layer: partitioning (mesh + logical-axis rules), train state and step, optimizers,
checkpointing, the input pipeline, metric writers, and the one training loop."""

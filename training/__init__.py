"""vvireid training: dataset readers, samplers, losses, objectives and the trainer."""

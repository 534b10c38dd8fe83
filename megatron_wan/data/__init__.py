"""Pre-encoded training data: shards, datasets and batch samplers."""

"""Real pretraining data and a real benchmark: token shards read memory-mapped in a shuffled order; HellaSwag."""

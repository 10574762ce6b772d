"""raypt: Ray-distributed LLM pre-training."""

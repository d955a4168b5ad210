"""Fine-tuning: trainable subsets, optimizer, data, the train loop, adapters."""

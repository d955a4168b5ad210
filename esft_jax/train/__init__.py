"""Fine-tuning: trainable subsets, optimizer, data, the train loop, adapters."""

METHODS = ("esft", "fft", "lora")  # the training methods (train/loop.build_method)

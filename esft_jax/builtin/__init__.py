"""What `make run` needs offline: the built-in task suite and the pretrained tiny MoE."""

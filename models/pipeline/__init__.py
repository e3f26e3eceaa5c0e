"""Off-device SG-LoRA model pipeline: task suite, expert LoRAs, CVAE, export, evaluation."""

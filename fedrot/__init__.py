"""FedRot-LoRA core."""

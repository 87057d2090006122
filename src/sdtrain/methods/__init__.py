"""Training methods (lora, dreambooth, finetune, ti): what is trained, conditioned and exported."""

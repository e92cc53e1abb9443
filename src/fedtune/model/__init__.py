"""The model: the base causal LM (`base`), its LoRA adapter in one flat buffer (`adapter`), and the
`[model]` and `[lora]` config sections (`settings`)."""

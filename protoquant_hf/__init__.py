"""protoquant_hf: ProtoQuant interpretable image classifiers for the Hugging Face ecosystem."""

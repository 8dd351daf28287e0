"""Import and export: safetensors checkpoints, ARPA files, Hugging Face and GGUF formats."""

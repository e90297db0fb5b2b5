"""How weights are read: one module per checkpoint format (Hugging Face safetensors folders are read by
pipeline/replay/load.py through transformers itself)."""

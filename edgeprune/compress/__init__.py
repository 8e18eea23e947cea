"""Compression: architecture adapters, importance, plans, surgery, reconstruction, sparsity, fine-tuning."""

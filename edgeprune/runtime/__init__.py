"""Runtimes for exported models. Must import without torch or transformers (edge devices lack them)."""

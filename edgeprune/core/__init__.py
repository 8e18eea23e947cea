"""Shared foundation every stage builds on; imports no stage (compress, exporters, runtime, eval, bench)."""

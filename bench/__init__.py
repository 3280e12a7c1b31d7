"""QuantKit benchmark: which format to pick on this hardware, and where QuantKit stands.
Entry point: python bench/run.py (see bench/README.md)."""

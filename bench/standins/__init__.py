"""Random-weight stand-ins for real model files (see build.py)."""

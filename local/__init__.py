"""Tooling for the local, CPU-only run: model preparation (runs in the engine's venv)."""

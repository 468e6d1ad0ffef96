"""Runnable training scripts (``python recipes/ddpo_is.py``); importable as ``recipes.*`` from the repo root."""

"""Shared pytest fixtures for the ckpt_callbacks test suite (none yet)."""

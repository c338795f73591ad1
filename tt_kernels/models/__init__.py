"""Pretrained models loaded offline (no network, no model hub) for fidelity measurements."""

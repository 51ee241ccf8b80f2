"""Drops: lifecycle state machine, creator API, settlement."""

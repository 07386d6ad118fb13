"""Trainers and checkpoints."""

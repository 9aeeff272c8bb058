"""occ_theory: measure how a Multi-Token Prediction loss helps or hurts RL (see docs/theory.md)."""

__version__ = "0.1.0"

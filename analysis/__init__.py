"""Offline analysis of run directories: loading, claim verdicts, figures. Never imports torch."""

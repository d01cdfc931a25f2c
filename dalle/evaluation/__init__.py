"""Measuring what was trained: `dalle eval`, the stage evaluations, the readers, the HTML report."""

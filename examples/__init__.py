"""Runnable examples that adapt public datasets to the mmfuse data contract."""

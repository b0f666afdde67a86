"""Batch serving of exported engines (to come with the export stage)."""

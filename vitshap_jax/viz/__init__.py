"""Pictures of explanations (matplotlib, file output only)."""

"""Training recipes: the loops that sample, score and update (side effects live here and in the CLI)."""

"""The checker and the fixes: how a repository converges, with no rollback."""

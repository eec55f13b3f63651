"""unirec."""

"""colm.deploy package."""

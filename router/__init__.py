"""colm.router package."""

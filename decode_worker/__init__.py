"""colm.decode_worker package."""

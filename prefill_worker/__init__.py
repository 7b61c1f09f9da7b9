"""colm.prefill_worker package."""

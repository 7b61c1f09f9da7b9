"""Subcommands of the ``colm`` CLI; each module has ``register(subparsers)``."""

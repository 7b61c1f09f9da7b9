"""Load test of a running colm service (same as ``colm loadtest``); see colm/loadtest.py."""

import sys

from colm.cli import main

if __name__ == "__main__":
    sys.exit(main(["loadtest", *sys.argv[1:]]))

import sys

from .cli import main

# Hydra and argparse name the program after sys.argv[0], which `python -m pipeline` sets to this file's path
sys.argv[0] = "sinktrace"
main()

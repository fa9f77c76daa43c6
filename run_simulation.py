#!/usr/bin/env python
"""Federated simulation over the hospital sites, with central and local-only baselines.

    python run_simulation.py --clients 3                                   # demo data
    python run_simulation.py --clients 3 --data-root ../shared/data/brain-mri

Same as `fedbt simulate`; `--help` lists every option.
"""

import sys

from fedbt.cli import build_parser, main

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        build_parser().parse_args(["simulate", "--help"])
    sys.exit(main(["simulate", *sys.argv[1:]]))

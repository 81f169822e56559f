#!/usr/bin/env python
"""Thin entry point: `python run_ablation.py --grid reduction` (see ablations/cli.py, or --help)."""

from ablations.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

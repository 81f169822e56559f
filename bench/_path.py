"""Puts this checkout's root first on sys.path, so `python bench/<script>.py` runs the packages next to it.

Every bench script imports it before anything of the project's (`import _path`): the script's own
folder is on sys.path already, the repository root is not, and an installed copy of the project
elsewhere must not be the one measured.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

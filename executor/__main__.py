"""`python -m executor plan.json ...` (also under torchrun)."""
import sys

from .cli import main

sys.exit(main())

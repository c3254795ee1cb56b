"""`python -m executor plan.json ...` (also under torchrun)."""
import sys
import warnings

# torch warns at import when NumPy is absent; the executor never needs NumPy
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .cli import main  # noqa: E402

sys.exit(main())

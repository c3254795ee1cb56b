"""`python -m executor plan.json ...` (also under torchrun)."""
import warnings

# torch warns at import when NumPy is absent; the executor never needs NumPy
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .cli import entry  # noqa: E402

entry()

"""The installed slimpipe's version, for `slimpipe --version` and `python -m executor --version`."""
from __future__ import annotations


def version() -> str:
    """pyproject's version as installed; says so when the package is not installed."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("slimpipe")
    except PackageNotFoundError:
        return "unknown (not installed; run pip install -e .)"

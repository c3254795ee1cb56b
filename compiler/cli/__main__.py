"""python -m compiler.cli: the slimpipe command without the installed script."""
import sys

from . import main

sys.exit(main())

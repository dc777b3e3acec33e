"""``python -m hetplugin.core``: the compute core's command line."""
import sys

from .cli import main

sys.exit(main())

"""`python -m dsdtune.report results/<study>`."""
import sys

from .cli import main

sys.exit(main())

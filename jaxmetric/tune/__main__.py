"""``python -m jaxmetric.tune`` (:func:`jaxmetric.tune.cli.main`)."""

import sys

from jaxmetric.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())

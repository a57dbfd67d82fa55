"""``python -m jaxmetric.search build | query | calibrate`` (:func:`jaxmetric.search.cli.main`)."""

import sys

from jaxmetric.search.cli import main

if __name__ == "__main__":
    sys.exit(main())

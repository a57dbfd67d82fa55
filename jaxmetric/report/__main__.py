"""``python -m jaxmetric.report RUN_DIR``: re-evaluate a saved run.

Restores the run's latest checkpoint, embeds, scores, draws and writes the report; the
command line is :func:`jaxmetric.report.main`.
"""

import sys

from jaxmetric.report import main

if __name__ == "__main__":
    sys.exit(main())

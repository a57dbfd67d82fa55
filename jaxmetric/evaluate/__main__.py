"""``python -m jaxmetric.evaluate RUN_DIR``: re-evaluate a saved run.

Restores the run's latest checkpoint, embeds, scores, draws and writes the report; the
command line is :func:`jaxmetric.report.main`. It is imported here, when the command
runs, because :mod:`jaxmetric.report` sits above this package (it uses the evaluation,
the pictures and the training code).
"""

import sys

if __name__ == "__main__":
    from jaxmetric.report import main

    sys.exit(main())

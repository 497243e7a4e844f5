"""``python -m coron_dask.cli``: the ``coron-dask`` command."""

import sys

from coron_dask.cli.main import main

sys.exit(main())

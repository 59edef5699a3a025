"""``python -m dask_gateway_scheduler_proxy``: the console script (used for worker children)."""

import sys

from .main import main

sys.exit(main())

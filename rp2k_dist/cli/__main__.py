"""``python -m rp2k_dist.cli``: the ``rp2k`` command (the entrypoint of submitted jobs)."""

import sys

from . import main

sys.exit(main())

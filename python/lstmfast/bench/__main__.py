"""``python -m lstmfast.bench``: see lstmfast.bench.cli."""

import sys

from lstmfast.bench import cli

sys.exit(cli.main())

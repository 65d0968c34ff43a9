"""``python -m clipbench`` (also ``torchrun -m clipbench run ...``)."""

import sys

from clipbench.cli import main

sys.exit(main())

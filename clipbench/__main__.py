"""``python -m clipbench`` (also ``torchrun -m clipbench run ...``)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m clipbench`` (also ``torchrun -m clipbench run ...``)."""

from clipbench.cli import entry

entry()

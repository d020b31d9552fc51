"""``python -m medseg``: the same as the ``medseg`` command."""

from medseg.cli import run

run()

"""medseg: 2D U-Net segmentation of medical volumes, written back on each scan's original grid."""

import logging

__version__ = "0.1.0"

# The library logs, never prints; applications decide where logs go.
logging.getLogger(__name__).addHandler(logging.NullHandler())

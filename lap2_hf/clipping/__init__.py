"""Per-sample gradient clipping without per-sample gradients (ghost norms + book-keeping).

See :mod:`lap2_hf.clipping.engine` for the entry point and DESIGN.md section 3 for the method.
"""

from .engine import GradClipper, UnsupportedLayerError
from .layers import rule_for

__all__ = ["GradClipper", "UnsupportedLayerError", "rule_for"]

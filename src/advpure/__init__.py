"""advpure: train and benchmark adversarial purification with score-based generative models.

Importing advpure changes no process setting. The commands (`advpure ...`, `python -m advpure`) make
theirs once (`advpure.core.runtime.configure`); Python-API users call that function first.
"""

import sys as _sys

__version__ = "0.1.0"

if "torch" in _sys.modules:  # imported after torch: OpenMP's wait policy can no longer be set
    from advpure.core.runtime import warn_if_spinning as _warn

    _warn()

"""The ``landscape`` command line (``landscape.cli.main``).

Importing this package asks PyTorch for transparent huge pages on its large CPU allocations
(``THP_MEM_ALLOC_ENABLE=1``, a PyTorch setting it reads once, at its first allocation: hence here, before anything
imports torch; a value the user set is kept). Without it every fresh large tensor is faulted in 4 KiB pages: a
float64 vector of MiniLM's 22.7 M parameters took 0.2 s to allocate and fill against 0.05 s with 2 MiB pages on this
machine, and a top-1 Hessian run spends a fifth of its time so (docs/hessian.md). On a kernel with THP set to
``never`` it changes nothing.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import os

import torch

if not torch.cuda.is_available():
    # Triton builds its own helpers (tl.sum, tl.cdiv, ...) for the interpreter or for a GPU when it is
    # first imported, so sparse_kernels' kernel is built for the interpreter here, before any test
    # imports triton. The variable is then restored: only tests that set TRITON_INTERPRET=1 send CPU
    # tensors through the (slow) interpreter; the rest keep the torch reference path.
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import sparse_kernels.gemv  # noqa: F401  (imports triton)

    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before

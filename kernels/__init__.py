"""fastattn's Triton kernels (installed as ``fastattn.kernels``). Each module holds ``_name_*_kernel`` functions
and plain launchers that reshape, allocate, choose block sizes and launch; no autograd here."""

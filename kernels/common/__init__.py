"""What every op of ``fastprefix.kernels`` shares: the runtime switches (``runtime``: no Triton import), the
host-side launch helpers (``launch``) and the device-side ``@triton.jit`` helpers (``jit``)."""

"""fastattn's Triton kernels (installed as ``fastattn.kernels``). Each module holds ``_name_*_kernel`` functions
and plain launchers that reshape, allocate, choose block sizes and launch; no autograd here."""
import functools

import torch

from ..backends import triton_interpreted

# Triton's interpreter mode, fixed at import as triton.jit fixes it for every kernel defined below this package (a
# launch that read the environment would pay ~1 us each time)
INTERPRETED = triton_interpreted()


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 for host code (>= 1): Triton 3.8's is a constexpr function, ~1.5 us a call."""
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """A CUDA device's number of SMs, asked of torch once per device (its query costs microseconds a launch)."""
    return _sms(device.index if device.index is not None else torch.cuda.current_device())

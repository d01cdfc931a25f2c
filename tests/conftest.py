"""Test-session settings.

One torch thread: the tests use tiny tensors, and on a shared 2-core machine OpenMP
barriers between two threads make every small op wait whenever another process holds a
core (measured: tests/test_sampling.py 132 s with 2 threads, 19 s with 1, load ~7).
"""

import torch

torch.set_num_threads(1)

import os

# Two cores are shared by the test process and any worker it starts: one thread each keeps
# them from slowing each other down by an order of magnitude (DESIGN.md, pitfalls).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

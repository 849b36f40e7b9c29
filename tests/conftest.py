import os

import torch
from hypothesis import HealthCheck, settings

# Two cores: keep each test process to one intra-op thread so parallel runs
# and the DDP subprocess tests do not oversubscribe the machine.
torch.set_num_threads(int(os.environ.get("SAMKIT_TEST_THREADS", "1")))

settings.register_profile(
    "samkit",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("samkit"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "samkit")

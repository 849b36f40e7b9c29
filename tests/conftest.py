import os
import tempfile

import torch
from hypothesis import HealthCheck, settings

# Two cores: keep each test process to one intra-op thread so parallel runs
# and the DDP subprocess tests do not oversubscribe the machine.
torch.set_num_threads(int(os.environ.get("SAMKIT_TEST_THREADS", "1")))

# Stable-Baselines3 makes an empty temporary folder for its logger on every
# learn(); one folder for the whole session instead of hundreds in /tmp.
os.environ.setdefault("SB3_LOGDIR", tempfile.mkdtemp(prefix="samkit-tests-sb3-"))

settings.register_profile(
    "samkit",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("samkit"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "samkit")

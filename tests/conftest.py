"""Session-wide test set-up."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def leave_process_group_at_the_end():
    """In-process training tests join a one-rank process group and keep it for the session; leave it
    before the interpreter exits, as the entry points do (``leave_world_after``): gloo's threads
    outliving the interpreter can abort the process after every test has passed."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

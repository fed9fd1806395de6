"""The calling thread inside another network namespace for a block (setns(2) through pyroute2).

Netlink and ioctl sockets belong to the namespace they were opened in, so code that plumbs another
namespace opens its handles inside this block and may use them after it. Only the calling thread
moves: others (ovsdbapp's connection thread, the agent's watches) stay where they are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pyroute2 import netns as pyroute2_netns


@contextlib.contextmanager
def thread_in(target: int | str) -> Iterator[None]:
    """The calling thread in the netns `target` (an open fd, or the path of one, which must exist:
    FileNotFoundError, never created) for the block, then back where it was."""
    fd = target if isinstance(target, int) else os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            pyroute2_netns.setns(fd)
            try:
                yield
            finally:
                pyroute2_netns.setns(here)
        finally:
            os.close(here)
    finally:
        if fd is not target:
            os.close(fd)

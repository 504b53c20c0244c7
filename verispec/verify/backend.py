"""Which implementation verifies a runner's logits: numpy on the host for runners that hand back host arrays
(llama.cpp), torch on the device for runners whose logits stay there (runners/torch.py: `logits_on_device`).

Both keep the same rules and return the same verdicts; the engine asks this module once per request and never
looks at which one it got. Classes are looked up when asked for, so a test can swap one for a broken variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class VerifyBackend:
    chain: type  # rejection.ChainVerifier's constructor and verify()
    tree: type  # tree.TreeVerifier's
    pick: Callable  # sampling.pick's signature: one token from one logit row
    margin: Callable  # top-1 minus top-2 logit of one row


def for_runner(runner) -> VerifyBackend:
    if getattr(runner, "logits_on_device", False):
        from . import device

        return VerifyBackend(device.DeviceChainVerifier, device.DeviceTreeVerifier, device.pick, device.top2_margin)
    from .. import sampling
    from . import rejection, tree

    return VerifyBackend(rejection.ChainVerifier, tree.TreeVerifier, sampling.pick, sampling.top2_margin)

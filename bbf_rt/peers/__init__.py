"""Peer interpolators that bbf-rt is compared with (evaluation only; never used by the runtime).

A peer is a callable `(frame0, frame1, taus) -> frames`: (B, 3, H, W) x2 and taus (B, F) or (F,) ->
(B, F, 3, H, W), frames in [0, 1] (float) or 0..255 (uint8). `metrics.evaluate(peers=...)` scores them
next to the model and linear blending.
"""
from bbf_rt.peers.rife import RIFEPeer, rife_unavailable

__all__ = ["RIFEPeer", "rife_unavailable"]

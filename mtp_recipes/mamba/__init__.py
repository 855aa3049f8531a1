"""Boundary-aware Mamba2 for packed rows: conv and SSD scan that reset at every document start (``seq_idx``)."""

from mtp_recipes.mamba.conv import causal_conv1d_varlen
from mtp_recipes.mamba.mixer import BoundaryAwareMamba2Mixer, mamba2_mixer_forward, use_boundary_aware_mamba
from mtp_recipes.mamba.ssd import mamba2_chunk_scan, ssd_chunk_scan

__all__ = [
    "BoundaryAwareMamba2Mixer",
    "causal_conv1d_varlen",
    "mamba2_chunk_scan",
    "mamba2_mixer_forward",
    "ssd_chunk_scan",
    "use_boundary_aware_mamba",
]

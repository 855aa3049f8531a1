"""Boundary-aware Mamba2 for packed rows: conv and SSD scan that reset at every document start (``seq_idx``)."""

from mtp_recipes.families.nemotron_h_mamba.conv import causal_conv1d_varlen
from mtp_recipes.families.nemotron_h_mamba.mixer import (
    BoundaryAwareMamba2Mixer,
    mamba2_mixer_forward,
    use_boundary_aware_mamba,
)
from mtp_recipes.families.nemotron_h_mamba.ssd import ssd_chunk_scan

__all__ = [
    "BoundaryAwareMamba2Mixer",
    "causal_conv1d_varlen",
    "mamba2_mixer_forward",
    "ssd_chunk_scan",
    "use_boundary_aware_mamba",
]

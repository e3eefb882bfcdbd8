"""Lightning callbacks shared by every model (they use only the model contract)."""

from .kl_breakdown import KLBreakdown
from .noise_variation import NoiseVariation
from .sample_grid import SampleGrid
from .test_report import TestReport

__all__ = ["KLBreakdown", "NoiseVariation", "SampleGrid", "TestReport"]

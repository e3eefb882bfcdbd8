"""Lightning callbacks shared by every model (they use only the model contract)."""

from .auxiliary_views import Colourizations, MultiScaleSamples
from .collapse_alarm import CollapseAlarm
from .guided_samples import GuidedSamples
from .kl_breakdown import KLBreakdown
from .latent_map import LatentMap
from .lossy_code import LossyCode
from .noise_variation import NoiseVariation
from .polyak import PolyakAveraging
from .run_checkpoint import RunCheckpoint
from .run_record import RunRecord
from .sample_grid import SampleGrid
from .test_report import TestReport

__all__ = [
    "CollapseAlarm",
    "Colourizations",
    "GuidedSamples",
    "KLBreakdown",
    "LatentMap",
    "LossyCode",
    "MultiScaleSamples",
    "NoiseVariation",
    "PolyakAveraging",
    "RunCheckpoint",
    "RunRecord",
    "SampleGrid",
    "TestReport",
]

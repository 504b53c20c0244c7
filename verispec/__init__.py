"""verispec: lossless speculative decoding for local LLMs."""

from .api import Completion, Model, load
from .engine import Engine, SpeculativeConfig, Stats
from .errors import VerispecError
from .sampling import SamplingParams

__all__ = ["load", "Model", "Completion", "Engine", "SpeculativeConfig", "SamplingParams", "Stats", "VerispecError"]
__version__ = "0.1.0"

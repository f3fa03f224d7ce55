from .config import ModelConfig
from .jamba import JambaLM, LMOutput

__all__ = ["ModelConfig", "JambaLM", "LMOutput"]

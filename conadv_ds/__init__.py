"""conadv_ds: Concurrent Adversarial Learning (ConAdv) for large-batch training on DeepSpeed."""

from .config import ConAdvConfig
from .engine import ConAdvEngine
from .errors import ConfigError
from .initialize import initialize
from .perturb import EmbeddingSpace, PixelSpace

__all__ = ["initialize", "ConAdvConfig", "ConAdvEngine", "ConfigError", "PixelSpace", "EmbeddingSpace"]
__version__ = "0.1.0"

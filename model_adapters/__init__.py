"""lm-eval model classes `arm`, `mdm` and `prime` (importing this package registers them)."""
import lm_eval.models  # noqa: F401  (lm-eval's built-ins first: its registry imports them only while empty)

from model_adapters.arm import ARMLM
from model_adapters.mdm import MDMLM
from model_adapters.prime import PrimeLM

__all__ = ["ARMLM", "MDMLM", "PrimeLM"]

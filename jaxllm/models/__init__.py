"""Model families (`MODELS`) and the modules they build. Importing the package registers the
built-in families: causal_lm, classifier, vlm, late_fusion, masked_lm."""

from jaxllm.models import causal_lm, classifier, late_fusion, masked_lm, transformer, vlm  # noqa: F401  (registers the built-in families)
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.transformer import NORM_PLACEMENTS, REMAT_POLICIES, Transformer, count_params

__all__ = ["MODELS", "ModelFamily", "NORM_PLACEMENTS", "REMAT_POLICIES", "Transformer", "count_params"]

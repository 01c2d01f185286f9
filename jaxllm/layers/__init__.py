"""Model building blocks: plain einsums over logical axis names, on top of jaxllm.ops.

Importing the package registers every built-in kind: attention kinds (layers.attention), MLP
kinds (layers.mlp, layers.moe), routers and dispatch strategies (layers.moe).
"""

from jaxllm.layers import attention, base, mlp, moe  # noqa: F401  (registers the built-in kinds)
from jaxllm.layers import sliding_window  # noqa: F401  (attention kind sliding_window)
from jaxllm.layers import expert_choice  # noqa: F401  (dispatch strategy expert_choice)
from jaxllm.layers import mla  # noqa: F401  (attention layer mla)
from jaxllm.layers.attention import ATTENTION_KINDS, ATTENTION_LAYERS
from jaxllm.layers.mlp import MLP_KINDS
from jaxllm.layers.moe import DISPATCHES, ROUTERS

__all__ = ["ATTENTION_KINDS", "ATTENTION_LAYERS", "MLP_KINDS", "DISPATCHES", "ROUTERS"]

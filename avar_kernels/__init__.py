"""avar-kernels: exact FlashAttention with per-class attention mass and class-wise score re-weighting.

Public API::

    attention(q, k, v, key_class, causal=True)            # [B, S, H, D] -> AttentionOutput(out, mass, lse)
    attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, key_class)   # packed [T, H, D]
    attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, key_class)   # decode
    Reweight(mul=..., abs=..., add=...)                    # class-wise score tables
"""
from .attention import attention, attention_varlen
from .kvcache import attention_with_kvcache
from .types import (
                    CLASS_NAMES,
                    IMAGE,
                    MAX_CLASSES,
                    NUM_CLASSES,
                    OTHER,
                    RESPONSE,
                    SYSTEM,
                    USER,
                    VIDEO,
                    AttentionOutput,
                    Reweight,
)

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "Reweight", "AttentionOutput",
           "OTHER", "IMAGE", "SYSTEM", "USER", "RESPONSE", "VIDEO", "NUM_CLASSES", "CLASS_NAMES", "MAX_CLASSES"]
__version__ = "0.1.0"

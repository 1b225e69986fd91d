"""The method: bases, the LLS latent, block signals (and their fused fast path), rules, network layouts
and models."""

"""The method: bases, block signals (and their fused fast path), rules, network layouts and models."""

"""The one accelerate training loop and the three stages it trains (dVAE, CLIP, transformer)."""

"""The networks: plain `nn.Module`s that return logits and losses, and their save/load."""

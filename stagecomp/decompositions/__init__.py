"""Decomposition math on tensors: weights in, factors out. No nn.Module here."""

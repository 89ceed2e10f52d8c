"""The nn.Modules that replace a decomposed layer, one class per file."""

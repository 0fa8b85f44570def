"""Losses, one per file, as small nn.Modules (no Ray)."""

"""Rank selection strategies."""

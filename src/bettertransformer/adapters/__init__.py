"""Adapters: one per family of layers, reading the stock modules through attribute paths."""

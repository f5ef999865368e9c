"""Weak-to-strong reasoning (Yang, Ma, Liu 2024): the `mathlm w2s` pipeline. See docs/w2s.md."""

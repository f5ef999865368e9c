"""The eval wing: load a run for inference, generate, grade, score perplexity (`mathlm generate`, `mathlm eval`)."""

"""Runnable applications built on llmlab (``python -m llmlab.apps.demo``: the end-to-end demo)."""

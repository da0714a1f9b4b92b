"""probprune: forward-only structural pruning of LLaMA-family LLMs with a policy-gradient search."""

__version__ = "0.1.0"

"""llmstack: one stack for LLM pretraining and fine-tuning."""

__version__ = "0.1.0"

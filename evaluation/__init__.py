"""The parts of evaluate.py: loading models and prompts, generation, judges, metrics, and the report."""

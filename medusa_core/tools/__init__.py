"""Tools around the serving engine: the heads' training data (ShareGPT, self-distilled replies, hidden-state caches),
training, evaluation, tree tuning, model cards, the oracle drafter of the tests and benchmarks, and the CLI commands
that run them. They import the engine (`medusa_core`); the engine never imports them, so a replica loads none of it.
"""

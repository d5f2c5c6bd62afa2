"""Evaluation: the zero-shot pack, perplexity, needle in a haystack and passkey, continual
learning, test-time memorisation around an item, associative recall, and the result files (see
the README's "Evaluate" section). Runs are loaded with `nested_learning.runs.load_run`; scoring
goes through the fast state with `nested_learning.models.streaming`."""

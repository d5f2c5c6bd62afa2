"""Evaluation: loading a trained run, streaming scoring through the fast state, test-time
memorisation around an item, and the result files (see the README's "Evaluate" section)."""

from .run import RunInfo, load_run
from .stream import Memorize, Validation, segment_losses, stream_document, validation_loss

__all__ = ["Memorize", "RunInfo", "Validation", "load_run", "segment_losses", "stream_document", "validation_loss"]

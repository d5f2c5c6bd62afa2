"""Constants shared by every layer of the package, each defined here once."""

IGNORE = -100  # the target index that cross-entropy skips (a position with no next token, padding);
# PyTorch's default ignore_index, so F.cross_entropy and linear_cross_entropy agree on it

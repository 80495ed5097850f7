"""Focus-N-Fix itself: the objective, the method's parts, the pure train step and its compiled pieces, the reference (Î0, M) cache."""

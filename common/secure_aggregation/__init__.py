"""What both sides of fedtune's SecAgg+ share: the mask generator, the signed statements, the roster."""

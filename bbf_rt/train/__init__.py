"""Training of the BBF model on procedural data: generators, ambiguity suite, curriculum, loop, metrics.

Needs the `train` extra (scikit-image for the photographs). See docs/training.md.
"""

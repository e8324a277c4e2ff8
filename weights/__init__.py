"""Weight files: this project's self-describing checkpoints (``weights.checkpoint``) and the
readers of PyTorch, Lightning and Jittor files that execute nothing (``weights.foreign``).

Numpy only: every network package loads and saves through here, and this package imports none
of them at import time. The one exception, ``weights.convert`` (the converter's checks), builds the
network it converts for to learn its shapes, importing autoencoder/ or models/ only when called.
"""

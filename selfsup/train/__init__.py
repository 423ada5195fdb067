"""The training loop (``loop``), schedules, optimisers, checkpoints and distributed helpers.

Import from the submodules (``selfsup.train.loop.pretrain``); this package file stays empty so the
low-level parts (``distributed``, ``checkpoint``) import without pulling in the loop.
"""

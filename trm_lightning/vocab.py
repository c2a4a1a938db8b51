"""The token vocabulary every part shares (``reference/trm.md`` §5.1): a leaf module, so ``models/`` never imports
``data/`` and the data, the losses and the callbacks agree on one set of numbers.

A canvas cell holds ``PAD`` (outside the grid), ``EOS`` (the border just below and right of the grid) or a
colour ``c`` in 0..9 as token ``c + COLOR_OFFSET``. Labels are the same tokens, with ``IGNORE_LABEL`` where a
cell is not supervised.
"""

PAD = 0
EOS = 1
COLOR_OFFSET = 2
NUM_COLOURS = 10
VOCAB_SIZE = COLOR_OFFSET + NUM_COLOURS  # 12
IGNORE_LABEL = -100

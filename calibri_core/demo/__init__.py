"""The demo: a miniature text-to-image world made in code, small enough to train and score on a CPU.

:mod:`.scenes` draws the images and captions (pure numpy, no downloads). The rule-based scorer that reads them back
lives with the search's rewards (``search/rewards/demo_rules.py``, reward name ``demo_rules``).
"""

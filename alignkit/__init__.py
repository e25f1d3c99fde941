"""alignkit: align language models — pre-training, SFT, reward models, PPO, DPO, Constitutional AI.

Kept import-light on purpose: importing ``alignkit`` does not import torch or transformers.
"""

__version__ = "0.1.0"

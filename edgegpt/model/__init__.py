"""The PyTorch side: edgegpt's GPT module, HF GPT-2 checkpoint I/O, tokenizers and training.

Importing this package imports torch.
"""

from edgegpt.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from edgegpt.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "load_checkpoint", "load_model", "save_checkpoint"]

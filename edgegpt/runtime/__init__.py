"""The embeddable runtime: numpy + onnxruntime + tokenizers, nothing else.

    from edgegpt.runtime import Generator
    gen = Generator.load("bundle/", provider="cpu", threads=4)
    print(gen.generate("Once upon a time", max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1))
"""

from edgegpt.runtime.generator import GenerationConfig, Generator
from edgegpt.runtime.providers import PROVIDERS, available
from edgegpt.runtime.sampling import SamplingParams
from edgegpt.runtime.session import ModelSession

__all__ = ["Generator", "GenerationConfig", "ModelSession", "SamplingParams", "PROVIDERS", "available"]

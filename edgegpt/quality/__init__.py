"""Quality of a bundle, measured with the runtime (numpy + onnxruntime): perplexity over strided
windows, KL divergence and top-1 agreement against a reference bundle (windowed and along the decode
path through the KV cache), and greedy agreement. Every stage that writes a bundle uses it."""

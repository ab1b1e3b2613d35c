"""A zoo of hand-written layers with their backward passes, correct and mutated.

``kernels`` holds every layer once, written against ``ops``; ``numpy_layers``,
``torch_layers`` and ``jax_layers`` wrap a kernel as a NumPy protocol model, a
``torch.autograd.Function`` inside an ``nn.Module``, and a ``jax.custom_vjp``.
"""

from .kernels import BY_NAME, GENERIC, LAYERS, Layer, Point, cases

__all__ = ["BY_NAME", "GENERIC", "LAYERS", "Layer", "Point", "cases"]

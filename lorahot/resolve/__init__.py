"""Where an adapter's module keys meet the model's layers.

- :mod:`~lorahot.resolve.user_map`: the user's ``prefix``, ``key_map`` and ``fuse``;
- :mod:`~lorahot.resolve.ldm`: original Stable Diffusion block names to diffusers ones;
- :mod:`~lorahot.resolve.split`: a fused module onto separate layers (Flux's qkv), and ``split=``;
- :mod:`~lorahot.resolve.file_names`: a layer's name as a file names it, wrapper levels dropped;
- :mod:`~lorahot.resolve.keys`: :func:`resolve_keys`, each module key to one injected layer;
- :mod:`~lorahot.resolve.components`: each module to its pipeline component by its prefix.
"""

from lorahot.resolve.keys import resolve_keys

__all__ = ["resolve_keys"]

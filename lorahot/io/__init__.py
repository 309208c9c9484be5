"""The read side: from a source (file, directory, mapping, Hub repo) to a normalized adapter.

- :mod:`~lorahot.io.dtypes`: the safetensors dtype table;
- :mod:`~lorahot.io.safety`: regular files only; checks of untrusted headers and JSON before
  anything is allocated;
- :mod:`~lorahot.io.tensorfile`: one-pass reads of a checked safetensors file;
- :mod:`~lorahot.io.hub`: the Hugging Face Hub, through ``huggingface_hub`` (with
  :mod:`~lorahot.io.hub_watch`, :mod:`~lorahot.io.hub_listing`, :mod:`~lorahot.io.hub_cache`,
  :mod:`~lorahot.io.hub_errors`);
- :mod:`~lorahot.io.sources`: opening any source into raw tensors, config and metadata;
- :mod:`~lorahot.io.patterns`: PEFT's ``rank_pattern``/``alpha_pattern`` in linear time (RE2);
- :mod:`~lorahot.io.config`: the adapter config fields lorahot honours, and those it refuses;
- :mod:`~lorahot.io.plain`: a caller's read options (``config=``, ``key_map=``, ...) as plain data;
- :mod:`~lorahot.io.loader`: :func:`read_adapter`, raw tensors to an :class:`~lorahot.Adapter`.
"""

from lorahot.io.loader import read_adapter

__all__ = ["read_adapter"]

"""Adapters that put SLA into other libraries' models.

- :mod:`sla_numba.integrations.diffusers` -- ``apply_sla(transformer)`` swaps the
  self-attention of a diffusers Wan2.1 (or DiT / PixArt-style) transformer for SLA.
  Needs ``pip install 'sla-numba[diffusers]'``.

Each adapter imports its library only when it is imported itself, so
``import sla_numba`` never needs diffusers.
"""

"""SLA inside diffusers models: a one-line swap of every self-attention.

>>> from sla_numba.integrations.diffusers import apply_sla
>>> apply_sla(pipe.transformer, topk=0.05)          # doctest: +SKIP

What :func:`apply_sla` does, layer by layer:

1. It finds every **self-attention** module of the model whose processor it knows:

   - Wan2.1 / Wan2.2 (``WanAttention`` with ``WanAttnProcessor``): ``attn1`` of each
     block. Cross-attention (``attn2``), including the image-conditioning path of the
     I2V models (``add_k_proj`` / ``add_v_proj``), is left alone.
   - any model built from diffusers' generic ``Attention`` with ``AttnProcessor2_0``
     or ``AttnProcessor`` (DiT, PixArt-α/Σ, ``BasicTransformerBlock`` models):
     the modules with ``is_cross_attention == False``.

2. It registers the layer's learnable projection on the module as ``attn.sla``, a
   :class:`sla_numba.SparseLinearAttention` (``attn.sla.proj``: fp32, zero-initialised,
   one per layer). The parameters are part of ``model.parameters()`` and of its
   ``state_dict()`` (``blocks.0.attn1.sla.proj.weight`` ...), so optimisers, ``.to()``,
   ``save_pretrained`` and ``torch.compile`` see them. Because the projection starts
   at zero, an untrained swap computes block-sparse attention.

3. It installs a processor that computes q, k, v exactly as the model's own processor
   does (projections, q/k norms, rotary embedding) and replaces only the attention
   itself: ``softmax(q kᵀ/√D) v`` becomes ``sla_attention(q, k, v)``.

:func:`remove_sla` restores the original processors and deletes ``attn.sla``.

Saving and loading
------------------
``model.save_pretrained(d)`` writes the dense weights, the SLA projections
(``*.sla.proj.*``) and the SLA settings (config key ``"_sla_numba"``; diffusers ignores
config keys that start with ``_`` when it builds a model). To get the SLA model back::

    model = load_sla_pretrained(WanTransformer3DModel, d)        # from_pretrained + SLA

or, for a model that is already loaded (e.g. a pipeline's transformer)::

    pipe = WanPipeline.from_pretrained(d_pipe)       # diffusers warns: sla.proj.* unused
    load_sla(pipe.transformer, d_pipe, subfolder="transformer")

Both read the settings from ``d/config.json`` and the projections from the local
checkpoint files (safetensors or ``.bin``, sharded or not). A Hub repository must be
downloaded first (``huggingface_hub.snapshot_download``). A plain ``from_pretrained``
gives the dense model; its config still carries the ``"_sla_numba"`` entry (diffusers
copies ``_`` keys over), so ask :func:`sla_layers` what actually runs SLA.

Layout
------
diffusers' processors hold q, k, v as (B, N, H, D); ``sla_numba`` takes (B, H, N, D).
All layout handling is in :func:`_attend` (two transposes there, nothing else).
"""

import json
import os

import torch

try:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
except ImportError as err:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "sla_numba.integrations.diffusers needs diffusers: "
        "pip install 'sla-numba[diffusers]' (or pip install diffusers)"
    ) from err

try:  # WanAttnProcessor as in diffusers 0.42 (tested); without it there are no Wan layers to patch
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
except ImportError:  # pragma: no cover - depends on the diffusers version
    WanAttnProcessor = None

from ..modules import SparseLinearAttention

__all__ = [
    "apply_sla",
    "remove_sla",
    "sla_layers",
    "load_sla",
    "load_sla_pretrained",
    "SLA_CONFIG_KEY",
]

#: The config key under which :func:`apply_sla` records its settings.
SLA_CONFIG_KEY = "_sla_numba"

#: The SLA settings that are saved (``backend`` is not: it depends on the machine).
_SAVED_SETTINGS = ("topk", "skip", "block_q", "block_k", "feature_map")


# ---------------------------------------------------------------------------
# The attention itself, and Wan's rotary embedding
# ---------------------------------------------------------------------------


def _attend(sla, q, k, v):
    """SLA on diffusers' (B, N, H, D) layout; returns (B, N, H, D).

    ``sla`` is the layer's :class:`SparseLinearAttention`, which takes (B, H, N, D).
    The transposed inputs are made contiguous: the kernels copy them to contiguous
    arrays anyway, and under ``torch.compile`` the custom op's fake kernel (as of this
    writing) gives its outputs the strides of a non-contiguous q while the real op
    returns contiguous ones, which breaks later views of the output.
    """
    # When sla_attention / SparseLinearAttention take layout="BNHD", this function
    # becomes: return sla(q, k, v, layout="BNHD")
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return sla(q, k, v).transpose(1, 2)


def _wan_rotary(x, freqs_cos, freqs_sin):
    """Wan's rotary embedding on x (B, N, H, D), as diffusers' Wan processor applies it.

    Channels (2i, 2i+1) form a pair rotated by one angle: the model's freqs tables
    (1, N, 1, D) repeat each angle's cos / sin twice, so the even columns of
    ``freqs_cos`` and the odd columns of ``freqs_sin`` hold one value per pair. The
    products are taken in the tables' dtype (float64 in Wan) and the result is
    returned in x's dtype.
    """
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    rot_even = x_even * cos - x_odd * sin
    rot_odd = x_even * sin + x_odd * cos
    return torch.stack((rot_even, rot_odd), dim=-1).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------


class _SLAProcessor:
    """Common part: remembers the processor it replaced, refuses what SLA cannot do."""

    # read (and set) by diffusers' set_attention_backend / context-parallel code;
    # SLA replaces the attention call, so these have no effect here.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, original):
        self.original = original

    @staticmethod
    def _check_call(encoder_hidden_states, attention_mask):
        if encoder_hidden_states is not None:
            raise ValueError(
                "an SLA self-attention layer was called with encoder_hidden_states; "
                "apply_sla only replaces self-attention"
            )
        if attention_mask is not None:
            raise ValueError("SLA self-attention does not take an attention_mask; got one")


class WanSLAProcessor(_SLAProcessor):
    """Wan2.1 self-attention (``WanAttention``, ``attn1``) with SLA.

    Same steps as diffusers' ``WanAttnProcessor`` for self-attention: q, k, v
    projections (fused or not), RMS q/k norms across heads, split into heads, Wan's
    rotary embedding; then SLA instead of softmax attention; then ``to_out``.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        self._check_call(encoder_hidden_states, attention_mask)
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        # (B, N, H*D) -> (B, N, H, D)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q = _wan_rotary(q, *rotary_emb)
            k = _wan_rotary(k, *rotary_emb)
        out = _attend(attn.sla, q, k, v).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class AttnSLAProcessor(_SLAProcessor):
    """Self-attention of diffusers' generic ``Attention`` with SLA.

    Same steps as ``AttnProcessor2_0`` for self-attention: optional spatial / group
    norm, 4-D (B, C, H, W) inputs flattened to tokens, q, k, v projections, per-head
    q/k norms, then SLA instead of softmax attention, ``to_out``, residual and
    output rescaling.
    """

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        self._check_call(encoder_hidden_states, attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            B, C = image_shape[:2]
            hidden_states = hidden_states.view(B, C, -1).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # (B, N, H*D) -> (B, N, H, D); the norms act on D alone, so the layout is free
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = _attend(attn.sla, q, k, v).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------
# Finding the layers
# ---------------------------------------------------------------------------


def _processor_kind(module):
    """'wan', 'attn2_0', 'attn' for a self-attention module SLA can replace, else None."""
    proc = getattr(module, "processor", None)
    if proc is None or not hasattr(module, "to_q") or getattr(module, "is_cross_attention", False):
        return None
    if WanAttnProcessor is not None and type(proc) is WanAttnProcessor:
        # self-attention never carries the I2V image keys; be sure anyway
        return "wan" if getattr(module, "add_k_proj", None) is None else None
    if type(proc) is AttnProcessor2_0:
        return "attn2_0"
    if type(proc) is AttnProcessor:
        return "attn"
    return None


def sla_layers(model):
    """The names of the modules of ``model`` that run SLA now (``[]`` if none)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(getattr(m, "processor", None), _SLAProcessor)
    ]


def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transformer must be a torch.nn.Module, got {type(model).__name__}")


# ---------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------


def apply_sla(
    transformer,
    *,
    topk=0.05,
    skip=0.10,
    block_q=64,
    block_k=64,
    feature_map="softmax",
    backend="auto",
):
    """Replace every self-attention of a diffusers transformer by SLA; returns the model.

    Parameters
    ----------
    transformer : torch.nn.Module
        e.g. ``WanTransformer3DModel`` (``pipe.transformer``), ``PixArtTransformer2DModel``,
        ``DiTTransformer2DModel``; patched in place.
    topk, skip, block_q, block_k, feature_map, backend
        As in :func:`sla_numba.sla_attention`, the same for every layer.

    Each replaced module gets ``module.sla``, a :class:`SparseLinearAttention` whose
    zero-initialised ``proj`` (fp32, on the layer's device) is trained with the model.
    Cross-attention and image-conditioning attention are left alone. Raises
    ``ValueError`` if SLA is already applied or no supported self-attention is found.

    Example
    -------
    >>> import torch
    >>> from diffusers import WanTransformer3DModel
    >>> from sla_numba.integrations.diffusers import apply_sla, remove_sla
    >>> model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
    ...     attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
    ...     ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    >>> model = apply_sla(model, topk=0.25, block_q=8, block_k=8)
    >>> [n for n, _ in model.named_parameters() if ".sla." in n][:2]
    ['blocks.0.attn1.sla.proj.weight', 'blocks.0.attn1.sla.proj.bias']
    >>> x = torch.randn(1, 4, 2, 8, 8)                      # (B, C, frames, height, width)
    >>> out = model(x, torch.tensor([500]), torch.randn(1, 5, 16)).sample
    >>> out.shape
    torch.Size([1, 4, 2, 8, 8])
    >>> remove_sla(model) is model
    True
    """
    _check_model(transformer)
    if sla_layers(transformer):
        raise ValueError("SLA is already applied to this model; call remove_sla first")
    targets = [
        (name, m, kind)
        for name, m in transformer.named_modules()
        if (kind := _processor_kind(m)) is not None
    ]
    if not targets:
        raise ValueError(
            f"found no self-attention in {type(transformer).__name__} that SLA can replace: "
            "supported are WanAttention with WanAttnProcessor and Attention with "
            "AttnProcessor2_0 / AttnProcessor (after set_attn_processor of another "
            "processor, set the default one back first)"
        )

    # Build every layer's SLA module before touching the model, so a bad argument
    # (checked by SparseLinearAttention) leaves the model unchanged.
    new = []
    for _name, module, kind in targets:
        head_dim = module.to_q.out_features // module.heads
        # AttnProcessor2_0 calls SDPA without a scale (1/sqrt(D)); AttnProcessor uses attn.scale
        scale = float(module.scale) if kind == "attn" else None
        sla = SparseLinearAttention(
            head_dim,
            topk=topk,
            skip=skip,
            block_q=block_q,
            block_k=block_k,
            feature_map=feature_map,
            scale=scale,
            backend=backend,
        )
        new.append((module, kind, sla.to(module.to_q.weight.device)))

    for module, kind, sla in new:
        module.add_module("sla", sla)
        proc = WanSLAProcessor if kind == "wan" else AttnSLAProcessor
        module.set_processor(proc(module.processor))

    if hasattr(transformer, "register_to_config"):
        settings = dict(
            topk=topk,
            skip=skip,
            block_q=block_q,
            block_k=block_k,
            feature_map=feature_map,
            layers=[name for name, _, _ in targets],
            sla_numba_version=_version(),
        )
        transformer.register_to_config(**{SLA_CONFIG_KEY: settings})
    return transformer


def remove_sla(transformer):
    """Undo :func:`apply_sla`: the original processors back, ``module.sla`` deleted.

    Returns the model. Raises ``ValueError`` if it has no SLA layer.
    """
    _check_model(transformer)
    removed = 0
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, _SLAProcessor):
            module.set_processor(proc.original)
            del module.sla
            removed += 1
    if removed == 0:
        raise ValueError(f"{type(transformer).__name__} has no SLA layer to remove")
    if hasattr(transformer, "register_to_config"):
        transformer.register_to_config(**{SLA_CONFIG_KEY: None})
    return transformer


def _version():
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _is_sla_key(key):
    return ".sla.proj." in key


def _with_variant(name, variant):
    """diffusers' naming of variant files: 'a.safetensors' -> 'a.fp16.safetensors'."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def _read_sla_tensors(directory, variant):
    """The ``*.sla.proj.*`` tensors of the checkpoint in ``directory`` (only those are read)."""
    from diffusers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFETENSORS_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    def files_of(index_name):
        with open(os.path.join(directory, index_name)) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({fn for key, fn in weight_map.items() if _is_sla_key(key)})

    for single, index, safe in (
        (SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, True),
        (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, False),
    ):
        single, index = _with_variant(single, variant), _with_variant(index, variant)
        if os.path.isfile(os.path.join(directory, single)):
            files = [single]
        elif os.path.isfile(os.path.join(directory, index)):
            files = files_of(index)
        else:
            continue
        tensors = {}
        for fn in files:
            path = os.path.join(directory, fn)
            if safe:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        if _is_sla_key(key):
                            tensors[key] = f.get_tensor(key)
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                tensors.update({k: t for k, t in sd.items() if _is_sla_key(k)})
        return tensors
    raise ValueError(
        f"found no diffusers checkpoint ({_with_variant(SAFETENSORS_WEIGHTS_NAME, variant)} "
        f"or {_with_variant(WEIGHTS_NAME, variant)}, or their index) in {directory}"
    )


def _local_dir(pretrained_path, subfolder):
    directory = os.path.join(os.fspath(pretrained_path), subfolder or "")
    if not os.path.isdir(directory):
        raise ValueError(
            f"pretrained_path must be a local directory, {directory!r} is not one "
            "(download a Hub repository first with huggingface_hub.snapshot_download)"
        )
    return directory


def load_sla(transformer, pretrained_path, *, subfolder=None, variant=None, backend="auto"):
    """Apply SLA to an already loaded dense ``transformer`` as it was saved in
    ``pretrained_path`` (settings from its ``config.json``, projections from its
    checkpoint); returns the model.

    For a model loaded by ``from_pretrained`` (alone or inside a pipeline) from a
    directory that ``save_pretrained`` wrote from an SLA model.
    """
    _check_model(transformer)
    directory = _local_dir(pretrained_path, subfolder)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in {directory}")
    with open(config_path) as f:
        settings = json.load(f).get(SLA_CONFIG_KEY)
    if not settings:
        raise ValueError(
            f"{config_path} has no SLA settings ({SLA_CONFIG_KEY!r}): "
            "the model was not saved with SLA applied"
        )
    apply_sla(transformer, backend=backend, **{k: settings[k] for k in _SAVED_SETTINGS})
    if sla_layers(transformer) != settings["layers"]:
        names = sla_layers(transformer)
        remove_sla(transformer)
        raise ValueError(f"the saved model had SLA in {settings['layers']}, this one gets {names}")

    tensors = _read_sla_tensors(directory, variant)
    expected = {k for k in transformer.state_dict() if _is_sla_key(k)}
    if set(tensors) != expected:
        remove_sla(transformer)
        raise ValueError(
            f"the checkpoint in {directory} has SLA projections {sorted(tensors)[:4]}..., "
            f"the model expects {sorted(expected)[:4]}... ({len(tensors)} vs {len(expected)})"
        )
    transformer.load_state_dict(tensors, strict=False)
    return transformer


def load_sla_pretrained(
    model_cls,
    pretrained_path,
    *,
    subfolder=None,
    variant=None,
    backend="auto",
    **from_pretrained_kwargs,
):
    """``model_cls.from_pretrained`` of a model saved with SLA applied, SLA included.

    ``model_cls.from_pretrained(pretrained_path, subfolder=..., variant=...,
    **from_pretrained_kwargs)`` loads the dense weights (diffusers' own loader:
    ``torch_dtype``, ``device_map`` ... work as usual), then :func:`load_sla` puts SLA
    back with the saved settings and projections. While diffusers loads, the
    ``*.sla.proj.*`` keys are added to ``model_cls._keys_to_ignore_on_load_unexpected``
    (restored afterwards), so diffusers does not warn that they were unused.

    Example
    -------
    >>> model.save_pretrained(d)                                          # doctest: +SKIP
    >>> model = load_sla_pretrained(WanTransformer3DModel, d)              # doctest: +SKIP
    """
    _local_dir(pretrained_path, subfolder)
    attr = "_keys_to_ignore_on_load_unexpected"
    own = model_cls.__dict__.get(attr, _MISSING)
    setattr(model_cls, attr, list(getattr(model_cls, attr, None) or []) + [r"\.sla\.proj\."])
    try:
        model = model_cls.from_pretrained(
            pretrained_path, subfolder=subfolder, variant=variant, **from_pretrained_kwargs
        )
    finally:
        if own is _MISSING:
            delattr(model_cls, attr)
        else:
            setattr(model_cls, attr, own)
    return load_sla(model, pretrained_path, subfolder=subfolder, variant=variant, backend=backend)


_MISSING = object()

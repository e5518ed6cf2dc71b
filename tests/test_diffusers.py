"""SLA inside diffusers models (sla_numba.integrations.diffusers), on tiny random models.

The models are built from small configs (no download, well under a second each):
a Wan2.1 ``WanTransformer3DModel`` (2 blocks, 2 heads of dim 12, 32 video tokens),
its I2V variant (image keys in the cross-attention), and a PixArt-α and a DiT
transformer (diffusers' generic ``Attention``).
"""

import copy
import doctest

import pytest
import torch
from helpers import assert_tensor_core_path, needs_real_gpu

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (pip install 'sla-numba[diffusers]')"
)

from sla_numba.integrations.diffusers import (  # noqa: E402
    SLA_CONFIG_KEY,
    apply_sla,
    load_sla,
    load_sla_pretrained,
    remove_sla,
    sla_layers,
)

WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
BLOCK = 8  # 32 tokens -> 4 query blocks x 4 key blocks per head


def make_wan(seed=0, **extra):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(**{**WAN, **extra}).eval()


def wan_inputs(seed=1, text_tokens=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)  # (B, C, frames, H, W) -> 2*4*4 = 32 tokens
    t = torch.tensor([500])
    text = torch.randn(1, text_tokens, 16, generator=g)
    return x, t, text


def run(model, inputs, **kw):
    return model(*inputs, **kw).sample


def processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("fused", [False, True], ids=["separate_qkv", "fused_qkv"])
def test_wan_topk_one_equals_dense_model(fused):
    """topk = 1 makes every key block critical: SLA is then exact softmax attention,
    so the patched model gives the unmodified model's output."""
    model, inputs = make_wan(), wan_inputs()
    if fused:
        model.fuse_qkv_projections()
    with torch.no_grad():
        dense = run(model, inputs)
        apply_sla(model, topk=1.0, block_q=BLOCK, block_k=BLOCK)
        sla = run(model, inputs)
    assert sla_layers(model) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert dense.abs().max() > 0.1
    torch.testing.assert_close(sla, dense, rtol=0, atol=1e-6)


def test_wan_sparse_swap_is_block_sparse_attention():
    """At topk < 1 the output changes (SLA runs), and with the zero-initialised
    projection the linear branch does not reach the output: any feature map gives
    the same result (an untrained swap is block-sparse attention)."""
    model, inputs = make_wan(), wan_inputs()
    with torch.no_grad():
        dense = run(model, inputs)
        outs = []
        for fm in ("softmax", "relu"):
            apply_sla(model, topk=0.25, skip=0.25, block_q=BLOCK, block_k=BLOCK, feature_map=fm)
            outs.append(run(model, inputs))
            remove_sla(model)
    assert (outs[0] - dense).abs().max() > 1e-3
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_wan_i2v_cross_attention_and_image_path_left_alone():
    """I2V Wan: the cross-attention carries the image keys (add_k_proj / add_v_proj);
    only the self-attention is replaced, the output is unchanged at topk = 1."""
    model = make_wan(image_dim=8, added_kv_proj_dim=24)  # = inner dim, as in Wan I2V
    x, t, _ = wan_inputs()
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, 512, 16, generator=g)  # diffusers' Wan I2V expects 512 text tokens
    image = torch.randn(1, 3, 8, generator=g)
    before = processors(model)
    with torch.no_grad():
        dense = model(x, t, text, encoder_hidden_states_image=image).sample
        apply_sla(model, topk=1.0, block_q=BLOCK, block_k=BLOCK)
        sla = model(x, t, text, encoder_hidden_states_image=image).sample
    after = processors(model)
    assert sla_layers(model) == ["blocks.0.attn1", "blocks.1.attn1"]
    for name in ("blocks.0.attn2", "blocks.1.attn2"):
        assert after[name] is before[name]
        assert model.get_submodule(name).add_k_proj is not None
        assert not hasattr(model.get_submodule(name), "sla")
    torch.testing.assert_close(sla, dense, rtol=0, atol=1e-6)


def _pixart():
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        use_additional_conditions=False,
    )
    g = torch.Generator().manual_seed(1)
    return model, dict(
        encoder_hidden_states=torch.randn(1, 5, 12, generator=g), timestep=torch.tensor([500])
    )


def _pixart_legacy_processor():
    """PixArt with the pre-SDPA AttnProcessor (it scales by attn.scale)."""
    from diffusers.models.attention_processor import AttnProcessor

    model, kw = _pixart()
    model.set_attn_processor(AttnProcessor())
    return model, kw


def _dit():
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
    )
    return model, dict(timestep=torch.tensor([10]), class_labels=torch.tensor([3]))


@pytest.mark.parametrize(
    "build",
    [_pixart, _pixart_legacy_processor, _dit],
    ids=["pixart_alpha", "pixart_attnprocessor", "dit"],
)
def test_generic_attention_models(build):
    """Other model families: PixArt-α and DiT blocks use diffusers' generic Attention
    with AttnProcessor2_0; self-attention (attn1) gets SLA, PixArt's cross-attention
    (attn2) keeps its processor; topk = 1 equals the dense model, remove_sla restores it."""
    torch.manual_seed(0)
    model, kw = build()
    model.eval()
    x = torch.randn(
        1, 4, 8, 8, generator=torch.Generator().manual_seed(2)
    )  # 4x4 patches = 16 tokens
    before = processors(model)
    assert ("transformer_blocks.0.attn2" in before) == (build is not _dit)
    with torch.no_grad():
        dense = model(x, **kw).sample
        apply_sla(model, topk=1.0, block_q=4, block_k=4)
        sla = model(x, **kw).sample
        assert sla_layers(model) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        for name, proc in processors(model).items():
            if not name.endswith("attn1"):
                assert proc is before[name], name
        assert dense.abs().max() > 0.1
        torch.testing.assert_close(sla, dense, rtol=0, atol=1e-6)
        remove_sla(model)
        assert torch.equal(model(x, **kw).sample, dense)


# --------------------------------------------------------------------------- training


def test_wan_training_step_updates_projection_and_q():
    model, inputs = make_wan(), wan_inputs()
    apply_sla(model, topk=0.25, block_q=BLOCK, block_k=BLOCK)
    model.train()
    sla_params = {n: p for n, p in model.named_parameters() if ".sla." in n}
    assert sorted(sla_params) == [
        f"blocks.{i}.attn1.sla.proj.{w}" for i in (0, 1) for w in ("bias", "weight")
    ]
    assert all(torch.count_nonzero(p) == 0 for p in sla_params.values())
    q_before = model.blocks[0].attn1.to_q.weight.detach().clone()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = run(model, inputs).square().mean()
    loss.backward()
    for name, p in sla_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    opt.step()
    for name, p in sla_params.items():
        assert p.abs().max() > 0, name
    assert (model.blocks[0].attn1.to_q.weight - q_before).abs().max() > 0


def test_wan_gradient_checkpointing_gives_the_same_gradients():
    """Fine-tuning large Wan models uses gradient checkpointing: the recomputed
    forward (same block classification) gives the gradients of the plain one."""
    grads = []
    for checkpointing in (False, True):
        model, inputs = make_wan(), wan_inputs()
        apply_sla(model, topk=0.25, block_q=BLOCK, block_k=BLOCK)
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        run(model, inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_wan_bf16_model():
    """Wan runs in bf16: the SLA layers take bf16 q, k, v (computed in fp32 inside)
    and keep their fp32 projection; at topk = 1 the output matches the dense bf16
    model to bf16 rounding."""
    model, inputs = make_wan().to(torch.bfloat16), wan_inputs()
    inputs = (inputs[0].bfloat16(), inputs[1], inputs[2].bfloat16())
    with torch.no_grad():
        dense = run(model, inputs)
        apply_sla(model, topk=1.0, block_q=BLOCK, block_k=BLOCK)
        sla = run(model, inputs)
    assert model.blocks[0].attn1.sla.proj.weight.dtype == torch.float32
    assert sla.dtype == torch.bfloat16
    torch.testing.assert_close(
        sla.float(), dense.float(), rtol=0, atol=2e-2
    )  # 1 bf16 ulp at 2.0 is 7.8e-3


# --------------------------------------------------------------------------- save / load

SAVE_FORMATS = {
    "safetensors": {},
    "bin": dict(safe_serialization=False),
    "safetensors_sharded_variant": dict(max_shard_size="30KB", variant="v1"),
}


@pytest.mark.parametrize("fmt", SAVE_FORMATS)
def test_save_pretrained_round_trip(tmp_path, fmt):
    # diffusers' from_pretrained of Wan needs accelerate (part of the [diffusers] extra)
    pytest.importorskip(
        "accelerate", reason="accelerate is not installed (pip install 'sla-numba[diffusers]')"
    )
    save_kw = SAVE_FORMATS[fmt]
    load_kw = {"variant": save_kw["variant"]} if "variant" in save_kw else {}
    model, inputs = make_wan(), wan_inputs()
    apply_sla(model, topk=0.25, skip=0.25, block_q=BLOCK, block_k=BLOCK, feature_map="elu")
    with torch.no_grad():  # trained-looking projections, so the round trip carries values
        for i, p in enumerate(p for n, p in model.named_parameters() if ".sla." in n):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        expected = run(model, inputs)
    model.save_pretrained(tmp_path, **save_kw)
    if "max_shard_size" in save_kw:
        assert (
            len([f for f in tmp_path.iterdir() if "index" not in f.name and f.suffix != ".json"])
            > 1
        )

    # 1. the one-call path
    loaded = load_sla_pretrained(diffusers.WanTransformer3DModel, tmp_path, **load_kw).eval()
    assert sla_layers(loaded) == sla_layers(model)
    sla = loaded.blocks[1].attn1.sla
    assert (sla.topk, sla.skip, sla.block_q, sla.block_k, sla.feature_map) == (
        0.25,
        0.25,
        BLOCK,
        BLOCK,
        "elu",
    )
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=0)
    # the temporary ignore pattern is gone again
    assert "_keys_to_ignore_on_load_unexpected" in diffusers.WanTransformer3DModel.__dict__
    assert not any(
        "sla" in p for p in diffusers.WanTransformer3DModel._keys_to_ignore_on_load_unexpected
    )

    # 2. a dense from_pretrained (as a pipeline does), then load_sla
    dense = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, **load_kw).eval()
    assert sla_layers(dense) == []
    load_sla(dense, tmp_path, **load_kw)
    with torch.no_grad():
        torch.testing.assert_close(run(dense, inputs), expected, rtol=0, atol=0)


def test_load_sla_refuses_a_dense_checkpoint(tmp_path):
    make_wan().save_pretrained(tmp_path)
    model = make_wan()
    with pytest.raises(ValueError, match="no SLA settings"):
        load_sla(model, tmp_path)
    assert sla_layers(model) == []
    with pytest.raises(ValueError, match="local directory"):
        load_sla(model, tmp_path / "nope")


# --------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """Forward and backward of the whole patched model under torch.compile, one graph
    (one block keeps the tracing time short; both blocks are traced the same way)."""
    model, inputs = make_wan(num_layers=1), wan_inputs()
    apply_sla(model, topk=0.25, block_q=BLOCK, block_k=BLOCK)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if ".sla." in n):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    eager = run(model, inputs)
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = run(compiled, inputs)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-5, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- remove / errors


def test_remove_sla_restores_exact_model():
    model, inputs = make_wan(), wan_inputs()
    before = processors(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        dense = run(model, inputs)
        apply_sla(model, topk=0.25, block_q=BLOCK, block_k=BLOCK)
        assert model.config[SLA_CONFIG_KEY]["layers"] == ["blocks.0.attn1", "blocks.1.attn1"]
        assert not torch.equal(run(model, inputs), dense)
        assert remove_sla(model) is model
        restored = run(model, inputs)
    assert torch.equal(restored, dense)
    assert processors(model).keys() == before.keys()
    assert all(processors(model)[n] is p for n, p in before.items())
    assert list(model.state_dict()) == keys
    assert model.config[SLA_CONFIG_KEY] is None


def test_bad_use_raises_clear_errors():
    model = make_wan()
    with pytest.raises(ValueError, match="topk"):
        apply_sla(model, topk=1.5)
    with pytest.raises(ValueError, match="block_q"):
        apply_sla(model, block_q=0)
    assert sla_layers(model) == []  # nothing half-applied
    with pytest.raises(ValueError, match="no SLA layer"):
        remove_sla(model)
    with pytest.raises(TypeError, match="transformer"):
        apply_sla("model")
    with pytest.raises(ValueError, match="no self-attention"):
        apply_sla(torch.nn.Linear(4, 4))
    apply_sla(model, block_q=BLOCK, block_k=BLOCK)
    with pytest.raises(ValueError, match="already applied"):
        apply_sla(model)
    attn = model.blocks[0].attn1
    h = torch.randn(1, 32, 24)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(h, None, torch.ones(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        attn(h, torch.randn(1, 5, 24))


def test_docstring_examples():
    import sla_numba.integrations.diffusers as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"


# --------------------------------------------------------------------------- CUDA tensors
# The same model family on a real GPU in bf16 (backend "gpu"): head_dim 64 and 64-token
# blocks, so the tensor-core path runs; 300 video tokens (3 frames of 10x10 patches)
# make 5 blocks per row, the last one partial. Skipped without a CUDA GPU (the
# simulator has no bf16 and the tensor cores need cc >= 8.0).

WAN_GPU = dict(WAN, attention_head_dim=64, ffn_dim=64)  # 2 heads of 64 -> inner dim 128
GPU_BLOCK = 64


def make_wan_bf16(device, seed=0):
    """The tiny Wan in bf16 as ``from_pretrained(torch_dtype=torch.bfloat16)`` makes it:
    the modules Wan keeps in fp32 (``_keep_in_fp32_modules``: time embedder, norms,
    rope ...) stay fp32, every other parameter is bf16."""
    model = make_wan(seed, **WAN_GPU).to(device)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if not keep.intersection(name.split(".")):
            p.data = p.data.to(torch.bfloat16)
    return model


def wan_inputs_bf16(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 20, 20, generator=g)  # -> 3 * 10 * 10 = 300 tokens
    text = torch.randn(1, 5, 16, generator=g)
    return x.bfloat16().to(device), torch.tensor([500], device=device), text.bfloat16().to(device)


def _f64(model, inputs):
    """The float64 copy of a model and its inputs: the same weights and inputs (bf16
    values are exact in float64), computed with float64 rounding: the reference."""
    ref = copy.deepcopy(model).to(torch.float64)
    return ref, tuple(x.double() if x.is_floating_point() else x for x in inputs)


def rel_err(a, ref):
    """RMS(a - ref) / RMS(ref), in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


@pytest.mark.gpu
@needs_real_gpu
def test_wan_bf16_cuda_topk_one_matches_dense_model():
    """topk = 1 on CUDA bf16 is exact attention computed in bf16 on tensor cores. Rule:
    the SLA model's relative RMS error against the float64 model (same weights) is at
    most 2x that of the plain bf16 model (SDPA) + 1e-3; with 1e-3 absolute slack on
    top of bf16's 3.9e-3 unit roundoff it cannot pass by accident: a wrong key block,
    head or token moves the output by O(1)."""
    assert_tensor_core_path(torch.bfloat16, 64, GPU_BLOCK, GPU_BLOCK)
    model, inputs = make_wan_bf16("cuda"), wan_inputs_bf16("cuda")
    ref_model, ref_inputs = _f64(model, inputs)
    with torch.no_grad():
        ref = run(ref_model, ref_inputs)
        dense = run(model, inputs)
        apply_sla(model, topk=1.0, block_q=GPU_BLOCK, block_k=GPU_BLOCK, backend="gpu")
        sla = run(model, inputs)
        assert sla_layers(model) == ["blocks.0.attn1", "blocks.1.attn1"]
        assert model.blocks[0].attn1.sla.proj.weight.device.type == "cuda"
        remove_sla(model)
        restored = run(model, inputs)
    assert sla.dtype == dense.dtype == torch.bfloat16 and sla.is_cuda
    assert torch.isfinite(sla).all()
    assert ref.abs().max() > 0.1
    err_dense, err_sla = rel_err(dense, ref), rel_err(sla, ref)
    print(f"rel-RMS error vs float64: dense bf16 {err_dense:.2e}, SLA bf16 {err_sla:.2e}")
    assert 0 < err_dense < 2e-2  # the bf16 model is a bf16 model, not an exact one
    assert err_sla <= 2 * err_dense + 1e-3, (err_sla, err_dense)
    assert torch.equal(restored, dense)  # remove_sla restores the model bit for bit


@pytest.mark.gpu
@needs_real_gpu
def test_wan_bf16_cuda_topk_one_gradients_match_dense_model():
    """Backward on CUDA bf16 at topk = 1: gradients of the input and of the attention
    projections against the float64 model's, by the rule of the forward test
    (2x the plain bf16 model's error + 2e-3: gradients pass through more bf16 products)."""
    model, inputs = make_wan_bf16("cuda"), wan_inputs_bf16("cuda")
    ref_model, ref_inputs = _f64(model, inputs)
    weight = torch.randn(1, 4, 3, 20, 20, generator=torch.Generator().manual_seed(5))
    names = [f"blocks.{i}.attn1.to_{p}.weight" for i in (0, 1) for p in "qkv"]

    def grads(m, inp):
        x = inp[0].detach().requires_grad_()
        out = run(m, (x, *inp[1:]))
        (out * weight.to(out)).sum().backward()
        params = dict(m.named_parameters())
        got = {"x": x.grad, **{n: params[n].grad for n in names}}
        m.zero_grad(set_to_none=True)
        return got

    ref, dense = grads(ref_model, ref_inputs), grads(model, inputs)
    apply_sla(model, topk=1.0, block_q=GPU_BLOCK, block_k=GPU_BLOCK, backend="gpu")
    sla = grads(model, inputs)
    for n in ref:
        assert sla[n].dtype == torch.bfloat16 and torch.isfinite(sla[n]).all(), n
        err_dense, err_sla = rel_err(dense[n], ref[n]), rel_err(sla[n], ref[n])
        print(f"{n}: rel-RMS error vs float64: dense bf16 {err_dense:.2e}, SLA {err_sla:.2e}")
        assert err_sla <= 2 * err_dense + 2e-3, (n, err_sla, err_dense)


@pytest.mark.gpu
@needs_real_gpu
@pytest.mark.parametrize("precision", ["bf16_weights", "autocast"])
def test_wan_cuda_training_step(precision):
    """One AdamW step of the SLA model on CUDA with all three block kinds (topk 0.4 and
    skip 0.2 of 5 key blocks: 2 critical, 2 marginal, 1 negligible per row): every
    gradient is finite, sla.proj and to_q get nonzero gradients and are updated.
    ``bf16_weights``: the bf16 model; ``autocast``: the fp32 model under
    ``torch.autocast("cuda", torch.bfloat16)`` (SLA sees bf16 q, k, v)."""
    if precision == "bf16_weights":
        model, inputs = make_wan_bf16("cuda"), wan_inputs_bf16("cuda")
    else:
        model = make_wan(**WAN_GPU).cuda()
        inputs = tuple(x.float() if x.is_floating_point() else x for x in wan_inputs_bf16("cuda"))
    apply_sla(model, topk=0.4, skip=0.2, block_q=GPU_BLOCK, block_k=GPU_BLOCK, backend="gpu")
    model.train()
    sla_params = {n: p for n, p in model.named_parameters() if ".sla." in n}
    assert all(p.is_cuda and p.dtype == torch.float32 for p in sla_params.values())
    to_q = model.blocks[0].attn1.to_q.weight
    q_before = to_q.detach().clone()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cuda", torch.bfloat16, enabled=precision == "autocast"):
        out = run(model, inputs)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    for name, p in [*sla_params.items(), ("to_q", to_q)]:
        assert p.grad is not None and p.grad.abs().max() > 0, name
    opt.step()
    for name, p in sla_params.items():
        assert torch.isfinite(p).all() and p.abs().max() > 0, name
    assert (to_q - q_before).abs().max() > 0

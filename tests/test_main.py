"""The main job (``python -m sla_numba``): runs end to end and reports what it measured."""

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from sla_numba import __main__ as main_job
from sla_numba import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(**over):
    args = main_job.demo_parser().parse_args([])
    small = dict(
        batch=1,
        heads=2,
        frames=2,
        height=8,
        width=8,
        dim=16,
        block=16,
        topk=0.25,
        skip=0.25,
        backend="cpu",
        repeats=2,
        fit_inputs=2,
        seed=0,
    )
    for key, value in {**small, **over}.items():
        setattr(args, key, value)
    return args


def test_main_job_table_is_consistent():
    out = io.StringIO()
    rows = main_job.run(_args(), out=out)
    text = out.getvalue()
    # 128 tokens in blocks of 16: Mk = 8, n_crit = 2, n_skip = 2
    assert rows["key blocks per query block"] == (
        "8 blocks of 16 tokens: 2 critical, 4 marginal, 2 negligible"
    )
    assert rows["kernel path"] == "cpu (backend='cpu')"
    errs = {k: float(v) for k, v in rows.items() if k.startswith("error vs dense")}
    assert len(errs) == 6 and all(np.isfinite(e) and e >= 0 for e in errs.values())
    sparse = errs["error vs dense: sparse-only (critical blocks exact, rest dropped)"]
    untrained = errs["error vs dense: SLA untrained (proj = 0, as the module starts)"]
    best = errs["error vs dense: SLA, proj fitted on this input (best any proj does)"]
    assert untrained == sparse  # the untrained module is block-sparse attention
    assert best <= sparse  # W = 0 is one of the projections the fit considers
    for key in ("time SLA forward (cpu)", "time dense: torch SDPA fp32 "):
        value = next(v for k, v in rows.items() if k.startswith(key))
        assert re.fullmatch(r"\d+\.\d\d ms \(\d+\.\d\d–\d+\.\d\d\)", value), value
    assert "nan" not in text
    assert rows["speed-up of SLA over dense (medians)"].endswith("x")
    assert "Reading: computing 2 of 8 key blocks exactly" in text


def _cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main_job.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("sla-numba"), lines
    return lines[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--topk", "1.5"), "argument --topk: must lie in (0, 1], got 1.5"),
        (("--topk", "x"), "argument --topk: must be a number, got 'x'"),
        (("--skip", "1"), "argument --skip: must lie in [0, 1), got 1"),
        (("--block", "0"), "argument --block: must be a positive integer, got '0'"),
        (("--repeats", "0"), "argument --repeats: must be a positive integer, got '0'"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    assert _cli_error(capsys, *argv).endswith("error: " + message)


def test_warmup_user_errors_are_one_line(capsys):
    line = _cli_error(capsys, "warmup", "--dtype", "int8")
    assert line.startswith("sla-numba warmup: error: dtypes: unknown dtype 'int8'")


def test_help_explains_every_option():
    for parser in (main_job.demo_parser(), main_job.warmup_parser()):
        for action in parser._actions:
            assert action.help, action.option_strings
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text


def test_gpu_without_a_gpu_is_one_line():
    """No GPU, no simulator: ``--backend gpu`` is one argparse line, and the API a
    RuntimeError naming the problem (not Numba's CudaSupportError traceback)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run(
        [sys.executable, "-m", "sla_numba", "--backend", "gpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("sla-numba: error: backend='gpu' cannot run here: ")
    )
    code = (
        "import numpy as np, sla_numba\n"
        "q = np.zeros((1, 1, 8, 4), np.float32)\n"
        "try:\n"
        "    sla_numba.sla_attention(q, q, q, backend='gpu')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("backend='gpu' cannot run here: "), res.stdout
    assert "CUDA" in res.stdout and "Traceback" not in res.stdout


def test_video_like_input_is_local_attention():
    """The demo input has the structure SLA is built for: the critical blocks hold
    far more of each query's attention mass than their share of the keys (on
    unstructured random data the two would be about equal)."""
    q, k, v = main_job.video_like_qkv(1, 1, 2, 8, 8, 16, seed=0)
    scale = 1 / np.sqrt(16)
    dense = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(dense - dense.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    block_map = reference.classify_reference(q, k, topk=0.25, skip=0.0, block_q=16, block_k=16)
    mask = reference.expand_block_map(np.asarray(block_map), 128, 128, 16, 16) == 1
    crit_mass = (p * mask).sum(-1).mean()
    share = mask.mean()  # 25 % of the keys
    assert crit_mass > 1.5 * share, (crit_mass, share)


def test_fit_projection_recovers_a_known_projection():
    rng = np.random.default_rng(0)
    o_s = rng.standard_normal((1, 2, 300, 8))
    o_l = rng.standard_normal((1, 2, 300, 8))
    w = rng.standard_normal((8, 8))
    b = rng.standard_normal(8)
    target = o_s + o_l @ w.T + b
    w_fit, b_fit = main_job.fit_projection(o_s, o_l, target, ridge=0.0)
    np.testing.assert_allclose(w_fit, w, atol=1e-8)
    np.testing.assert_allclose(b_fit, b, atol=1e-8)


def test_warmup_command_compiles_and_reports(capsys):
    assert (
        main_job.main(
            [
                "warmup",
                "--head-dim",
                "8",
                "--dtype",
                "fp32",
                "--backend",
                "cpu",
                "--block-q",
                "16",
                "--block-k",
                "16",
                "--no-backward",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("sla_numba warmup: 1 step in ") and "(cpu)" in out

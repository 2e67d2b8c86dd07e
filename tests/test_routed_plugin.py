"""A routed transform registered as a plugin: inexact formats need --allow-inexact and record a measured gap."""

import pytest
import torch

import moefy
from moefy.moe.layer import MoeLayer
from moefy.plan import LayerPlan, Options
from moefy.transforms import TRANSFORMS
from moefy.transforms.base import Transform
from moefy_kernels import cpu_decode
from tests.conftest import logits, random_ids, read_json, run_cli


class ToyRouteOptions(Options):
    experts: int = 4
    top_k: int = 2
    combine: str = "unit"


class ToyRoute(Transform):
    """Equal slices + a seeded random router: the smallest routed MoE, for exercising the pipeline."""

    name = "toy_route"
    Options = ToyRouteOptions
    summary = "test only"

    def plan(self, previous, source):
        o = self.options
        return LayerPlan(num_experts=o.experts, expert_width=source.mlp_width // o.experts, scoring="softmax",
                         top_k=o.top_k, combine=o.combine)

    def apply(self, layer, mlp, inputs=None):
        o = self.options
        router = torch.randn(o.experts, mlp.up.shape[1], generator=torch.Generator().manual_seed(self.seed + layer))
        return MoeLayer(mlp=mlp, widths=[mlp.width // o.experts] * o.experts, scoring="softmax", top_k=o.top_k,
                        combine=o.combine, router=router)


@pytest.fixture
def toy_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(TRANSFORMS, ToyRoute.name, ToyRoute)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("transforms: [{toy_route: {experts: 4, top_k: 2, combine: unit}}]\n")
    return recipe


def test_inexact_format_is_refused_without_flag(tiny, tmp_path, toy_recipe):
    code, _, err = run_cli("convert", tiny("llama"), "-r", toy_recipe, "-o", tmp_path / "out", "--format", "mixtral")
    assert code == 2 and "would change the model's function" in err and "--allow-inexact" in err


def test_auto_picks_native_for_unit_weights_and_backends_agree(tiny, tmp_path, toy_recipe):
    out = tmp_path / "out"
    assert run_cli("convert", tiny("llama"), "-r", toy_recipe, "-o", out)[0] == 0
    assert read_json(out / "config.json")["model_type"] == "moefy"
    ids = random_ids()
    fast = logits(moefy.load(out, backend="torch"), ids)
    torch.testing.assert_close(fast, logits(moefy.load(out, backend="reference"), ids), atol=1e-5, rtol=1e-5)
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(remote, ids), fast, atol=1e-5, rtol=1e-5)


def test_allowed_inexact_export_records_the_measured_gap(tiny, tmp_path, toy_recipe):
    out, exact = tmp_path / "out", tmp_path / "exact"
    src = tiny("llama")
    code, _, err = run_cli("convert", src, "-r", toy_recipe, "-o", out, "--format", "mixtral", "--allow-inexact")
    assert code == 0, err
    fmt = read_json(out / "moefy.json")["format"]
    assert fmt["exact"] is False and "unit weights" in fmt["reason"]
    assert run_cli("convert", src, "-r", toy_recipe, "-o", exact, "--format", "native")[0] == 0
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    measured = (logits(moefy.load(out), ids) - logits(moefy.load(exact), ids)).abs().max().item()
    assert fmt["gap"]["max_abs_logit_diff"] == pytest.approx(measured, rel=1e-4)
    assert measured > 1e-4  # unit weights vs renormalised probabilities really differ


def test_the_gap_of_a_distilled_inexact_export_is_the_formats_alone(tiny, tmp_path, toy_recipe):
    """A recipe that trains (distill's layer-local stage): the recorded gap compares the written blocks with the
    same trained blocks in the native format, not with a second, untrained run of the pipeline."""
    src, out, exact = tiny("llama"), tmp_path / "out", tmp_path / "exact"
    toy_recipe.write_text("transforms:\n  - toy_route: {experts: 4, top_k: 2, combine: unit}\n"
                          "  - distill: {budget: {tokens: 2048}, batch_tokens: 64, holdout_tokens: 64}\n"
                          "calibration: {samples: 4, seq_len: 64}\n")
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["-r", toy_recipe, "--calib", calib]
    code, _, err = run_cli("convert", src, *common, "-o", out, "--format", "mixtral", "--allow-inexact")
    assert code == 0, err
    assert run_cli("convert", src, *common, "-o", exact, "--format", "native")[0] == 0
    record = read_json(out / "moefy.json")
    assert record["layers"] == read_json(exact / "moefy.json")["layers"]  # the same training, byte for byte
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    measured = (logits(moefy.load(out), ids) - logits(moefy.load(exact), ids)).abs().max().item()
    assert record["format"]["gap"]["max_abs_logit_diff"] == pytest.approx(measured, rel=1e-4)


def test_prob_combine_is_exact_in_qwen2_moe(tiny, tmp_path, toy_recipe):
    out, exact = tmp_path / "out", tmp_path / "exact"
    src = tiny("llama")
    args = ["--set", "transforms.0.toy_route.combine=prob"]
    assert run_cli("convert", src, "-r", toy_recipe, "-o", out, "--format", "qwen2_moe", *args)[0] == 0
    assert read_json(out / "config.json")["norm_topk_prob"] is False
    assert run_cli("convert", src, "-r", toy_recipe, "-o", exact, "--format", "native", *args)[0] == 0
    ids = random_ids()
    torch.testing.assert_close(logits(moefy.load(out), ids), logits(moefy.load(exact), ids), atol=1e-5, rtol=1e-5)


VALIDATE_KEYS = ("backend", "max_abs_diff", "max_rel_diff", "tokens", "passed")


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: in the interpreter on CPU
@pytest.mark.parametrize("fmt", ["native", "qwen2_moe"])
def test_validate_passes_on_routed_exports(tiny, tmp_path, toy_recipe, fmt, backend):
    out = tmp_path / "out"
    extra = ["--set", "transforms.0.toy_route.combine=prob"] if fmt == "qwen2_moe" else []
    assert run_cli("convert", tiny("llama"), "-r", toy_recipe, "-o", out, "--format", fmt, *extra)[0] == 0
    report_path = tmp_path / "v.json"
    code, stdout, err = run_cli("validate", out, "--json", report_path, "--backend", backend)
    assert code == 0, stdout + err
    report = read_json(report_path)
    assert all(k in report for k in VALIDATE_KEYS) and report["passed"] and report["max_abs_diff"] < 1e-5
    assert report["backend"] == backend
    implementations = {r["implementation"] for r in report["blocks"]}
    fused = {"moefy:fused-decode"} if backend == "torch" and cpu_decode.kernel() is not None else set()
    assert implementations == ({f"moefy:{backend}"} if fmt == "native" else
                               {f"moefy:{backend}", "transformers", f"transformers+moefy_{backend}", *fused})


def test_validate_catches_a_wrong_backend(tiny, tmp_path, toy_recipe, monkeypatch):
    import moefy_kernels

    out = tmp_path / "out"
    assert run_cli("convert", tiny("llama"), "-r", toy_recipe, "-o", out)[0] == 0
    real = moefy_kernels.BACKENDS["torch"]
    wrong = moefy_kernels.Backend(real.route, lambda *a: real.experts(*a) * 1.01)
    monkeypatch.setitem(moefy_kernels.BACKENDS, "torch", wrong)
    code, stdout, err = run_cli("validate", out)
    assert code == 1 and "does not match the reference" in err


def test_validate_static_exports_and_dense_input(tiny, tmp_path):
    src = tiny("llama")
    for fmt in ("native", "mixtral"):
        out = tmp_path / fmt
        assert run_cli("convert", src, "-r", "mlpmoe-compensated", "-o", out, "--format", fmt)[0] == 0
        code, stdout, err = run_cli("validate", out, "--source", src)
        assert code == 0, stdout + err
    code, _, err = run_cli("validate", src)
    assert code == 2 and "no MoE blocks" in err


@pytest.mark.parametrize("fmt", ["native", "qwen2_moe"])
def test_distill_trains_what_the_format_says_routes(tiny, tmp_path, toy_recipe, fmt):
    """`distill end_to_end train: router` takes each block's routing submodules from its format (native: the
    router and the expert scales; standard: the format's router attribute and its extra routing modules), and
    `moe` every block parameter."""
    from moefy.transforms.end_to_end import _trainable

    out = tmp_path / "out"
    extra = ["--set", "transforms.0.toy_route.combine=prob"] if fmt == "qwen2_moe" else []
    assert run_cli("convert", tiny("llama"), "-r", toy_recipe, "-o", out, "--format", fmt, *extra)[0] == 0
    model = moefy.load(out)
    named = {id(p): n for n, p in model.named_parameters()}
    routing = {named[id(p)].split(".mlp.")[1] for p in _trainable(model, "router")}
    # qwen2_moe: its router and the shared expert's gate (written even without a shared expert: an all-zero one)
    assert routing == ({"router.weight", "expert_scales"} if fmt == "native" else
                       {"gate.weight", "shared_expert_gate.weight"})
    assert all(p.requires_grad == (named[id(p)].split(".mlp.")[-1] in routing and ".mlp." in named[id(p)])
               for p in model.parameters())
    moe = {named[id(p)] for p in _trainable(model, "moe")}
    assert moe == {n for n, _ in model.named_parameters() if ".mlp." in n}

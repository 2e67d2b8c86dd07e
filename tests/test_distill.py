"""distill: layer-local training of MoE blocks against the dense MLP, inside the layer-by-layer pass."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_matches_dense, read_json, run_cli

CALIBRATION = "calibration: {samples: 24, seq_len: 64}\n"


def _recipe(directory: Path, carve: str, distill: str | None = "{budget: {tokens: 16384}}") -> Path:
    """carve, then distill (None: carve alone)."""
    path = directory / "recipe.yaml"
    steps = f"  - carve: {carve}\n" + ("" if distill is None else f"  - distill: {distill}\n")
    path.write_text(f"name: test-distill\ntransforms:\n{steps}{CALIBRATION}")
    return path


def _convert(src, recipe, out, text_file, *extra):
    code, _, stderr = run_cli("convert", src, "-r", recipe, "-o", out, "--calib", text_file, *extra)
    assert code == 0, stderr
    return read_json(out / "moefy.json")


def test_distill_lowers_every_layers_loss_and_records_it(tiny, tmp_path, text_file):
    src = tiny("llama", intermediate_size=256)
    record = _convert(src, _recipe(tmp_path, "{experts: 8, shared: 1, top_k: 2}"), tmp_path / "out", text_file)
    for stats in record["layers"].values():
        d = stats["distill"]
        assert d["kept"] and d["holdout_loss_after"] < 0.95 * d["holdout_loss_before"]
        assert d["steps"] == 16384 // 2 // 512 and d["tokens"] == d["steps"] * 512  # the budget, split over 2 layers
    assert record["format"]["name"] == "granitemoeshared"  # no new tensors: still exact in the standard format


def test_distill_is_deterministic(tiny, tmp_path, text_file):
    src = tiny("llama", intermediate_size=256)
    recipe = _recipe(tmp_path, "{experts: 8, shared: 1, top_k: 2}")
    for name in ("a", "b"):
        _convert(src, recipe, tmp_path / name, text_file, "--seed", "3")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distilling_an_exact_block_changes_nothing(tiny, tmp_path, text_file):
    """Every expert active: the block already equals the dense MLP; distill keeps it (no drift)."""
    src = tiny("llama", intermediate_size=256)
    record = _convert(src, _recipe(tmp_path, "{experts: 8, shared: 0, top_k: 8, compensation: {refit_down: false}}"),
                      tmp_path / "out", text_file)
    assert not any(s["distill"]["kept"] for s in record["layers"].values())
    assert_matches_dense(tmp_path / "out", src)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("first", ["upcycle: {experts: 4, top_k: 2, drop: 0.5}",
                                   "slice: {experts: 8, prune: {branches: 2}}"])
def test_distill_after_upcycle_and_slice(tiny, tmp_path, text_file, family, first):
    """Routed (straight-through router gradient) and static blocks, gated and GPT-2's biased layout; a trained
    output bias makes the export native."""
    src = tiny(family, **({"n_inner": 128} if family == "gpt2" else {}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"transforms:\n  - {first}\n  - distill: {{budget: {{tokens: 8192}}, train: [router, experts, "
                      f"scales, bias], lr: 1e-3}}\n{CALIBRATION}")
    record = _convert(src, recipe, tmp_path / "out", text_file)
    assert record["format"]["name"] == "native"
    losses = [(s["distill"]["holdout_loss_before"], s["distill"]["holdout_loss_after"])
              for s in record["layers"].values()]
    assert all(after <= before for before, after in losses) and any(after < before for before, after in losses)
    assert run_cli("validate", tmp_path / "out")[0] == 0


@pytest.mark.parametrize("transforms,message", [
    ("  - carve: {experts: 4, top_k: 2}\n  - distill: {budget: {tokens: 0}}", "greater than 0"),
    ("  - carve: {experts: 4, top_k: 2}\n  - distill: {budget: {minutes: -1}}", "greater than 0"),
    ("  - carve: {experts: 4, top_k: 2}\n  - distill: {budget: {}}", "budget.tokens, budget.minutes"),
    ("  - carve: {experts: 4, top_k: 2}\n  - distill: {}", "give budget (layer-local stage), end_to_end"),
    ("  - carve: {experts: 4, top_k: 2}\n  - distill: {end_to_end: {budget: {tokens: 64}, train: lora}}", "train"),
    ("  - distill: {budget: {tokens: 100}}", "put it after carve"),
    ("  - slice: {experts: 4}\n  - distill: {budget: {tokens: 100}, train: [router, shared]}", "nothing to train"),
])
def test_distill_bad_input(tiny, tmp_path, text_file, transforms, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"transforms:\n{transforms}\n{CALIBRATION}")
    code, stdout, stderr = run_cli("convert", tiny("llama"), "-r", recipe, "-o", tmp_path / "out", "--calib", text_file)
    assert code == 2 and message in stderr and "Traceback" not in stderr + stdout, stderr
    assert not (tmp_path / "out").exists()


def test_distill_needs_calibration(tiny, tmp_path):
    recipe = _recipe(tmp_path, "{experts: 4, top_k: 2}")
    recipe.write_text(recipe.read_text().replace(CALIBRATION, ""))
    code, _, stderr = run_cli("convert", tiny("llama"), "-r", recipe, "-o", tmp_path / "out")
    assert code == 2 and "calibration data" in stderr


E2E = "{end_to_end: {budget: {tokens: 1024}, lr: 1e-3}}"


@pytest.mark.parametrize("family,carve,fmt", [
    ("llama", "{experts: 8, shared: 1, top_k: 2}", "granitemoeshared"),
    ("llama", "{experts: 128, shared: 16, top_k: 24}", "native"),  # 2-wide experts, as carve-50-distill's
    ("gpt2", "{experts: 8, shared: 1, top_k: 2}", "native"),
])
def test_end_to_end_distillation(tiny, tmp_path, text_file, family, carve, fmt, monkeypatch):
    """KL to the dense logits on calibration samples; the trained weights are written in the format's layout
    and load back (standard: stock transformers; native: both loaders), and every block still validates.
    Standard exports train on the `torch` experts backend (grouped matmuls, differentiable), native
    blocks too."""
    from transformers import AutoModelForCausalLM

    import moefy_kernels

    calls = []
    fast = moefy_kernels.BACKENDS["torch"]
    monkeypatch.setitem(moefy_kernels.BACKENDS, "torch", moefy_kernels.Backend(
        fast.route, lambda *args, **kwargs: calls.append(torch.is_grad_enabled()) or fast.experts(*args, **kwargs)))
    src = tiny(family, **({"n_inner": 128} if family == "gpt2" else {"intermediate_size": 256}))
    record = _convert(src, _recipe(tmp_path, carve, E2E), tmp_path / "out", text_file)
    assert any(calls)  # the training steps ran on it
    e2e = record["finalize"]["distill"]
    assert record["format"]["name"] == fmt and e2e["kept"] and e2e["holdout_kl_after"] < e2e["holdout_kl_before"]
    assert e2e["steps"] == 1024 // 64 and e2e["tokens"] == 1024 and e2e["stopped_by"] == "tokens"
    assert all("distill" not in s for s in record["layers"].values())  # no layer-local stage asked for
    assert run_cli("validate", tmp_path / "out")[0] == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=fmt == "native")


def test_end_to_end_is_deterministic_and_leaves_an_exact_model_alone(tiny, tmp_path, text_file):
    src = tiny("llama", intermediate_size=256)
    recipe = _recipe(tmp_path, "{experts: 8, shared: 1, top_k: 2}", E2E)
    for name in ("a", "b"):
        _convert(src, recipe, tmp_path / name, text_file)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recomputed = E2E.replace("lr: 1e-3", "lr: 1e-3, checkpointing: true")  # same steps, activations recomputed
    _convert(src, _recipe(tmp_path, "{experts: 8, shared: 1, top_k: 2}", recomputed), tmp_path / "c", text_file)
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-6) for k in a)
    exact = _convert(src, _recipe(tmp_path, "{experts: 8, shared: 0, top_k: 8, compensation: {refit_down: false}}",
                                  E2E), tmp_path / "exact", text_file)
    assert not exact["finalize"]["distill"]["kept"]
    assert_matches_dense(tmp_path / "exact", src)


def test_end_to_end_needs_samples_to_train_on(tiny, tmp_path, text_file):
    recipe = _recipe(tmp_path, "{experts: 4, top_k: 2}", "{end_to_end: {budget: {tokens: 64}, holdout_samples: 24}}")
    code, _, stderr = run_cli("convert", tiny("llama"), "-r", recipe, "-o", tmp_path / "out", "--calib", text_file)
    assert code == 2 and "at least 25 calibration samples" in stderr


def test_end_to_end_minutes_cover_loading_and_evaluation(tiny, tmp_path, text_file):
    """A budget the stage's own loading and first evaluation use up: no training step starts, and the
    written model stays as the carve left it (the same bytes as without the distill step)."""
    src = tiny("llama", intermediate_size=256)
    carve = "{experts: 8, shared: 1, top_k: 2}"
    record = _convert(src, _recipe(tmp_path, carve, "{end_to_end: {budget: {minutes: 0.00001}}}"), tmp_path / "out",
                      text_file)
    e2e = record["finalize"]["distill"]
    assert e2e["steps"] == 0 and not e2e["kept"] and e2e["holdout_kl_after"] == e2e["holdout_kl_before"]
    assert e2e["stopped_by"] == "clock"
    _convert(src, _recipe(tmp_path, carve, None), tmp_path / "carved", text_file)
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "carved" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_ends_with_small_steps_when_the_clock_stops_it():
    """A minutes budget that binds before the step budget: the cosine follows the clock, so the last step is
    a small fraction of the first (loss = t with gradient 1: each Adam step is about the current lr), and
    no step starts that the pace says would end after the clock."""
    import time

    from moefy.transforms.end_to_end import train_adam

    t = torch.ones(1, requires_grad=True)
    values = []

    def loss_fn(step):
        values.append(t.item())
        time.sleep(0.05)
        return t.sum()

    done, _, seconds = train_adam([([t], 0.01)], loss_fn, steps=1000, seconds=1.0)
    deltas = [a - b for a, b in zip(values, values[1:])]
    assert 5 < done < 1000 and 0.9 < seconds <= 1.0 + 0.05  # one step's length of slack for a slow sleep
    assert deltas[-1] < 0.2 * deltas[0]


@pytest.mark.parametrize("name,budget", [("carve-50-distill", 0.5), ("carve-25-distill", 0.25)])
def test_shipped_distill_recipes_stay_within_their_active_budget(name, budget):
    """On the demo model's shape (30 layers): the dense layers count whole, the others shared + top_k."""
    from moefy.recipe import load_recipe

    carve = load_recipe(name).transforms[0]["carve"]
    layers, dense = 30, len(carve["dense_layers"])
    active = (dense + (layers - dense) * (carve["shared"] + carve["top_k"]) / carve["experts"]) / layers
    assert budget - 0.02 < active <= budget  # 0.4865 and 0.2498

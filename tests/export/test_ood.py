"""The in-distribution score's fit (numpy only): shrinkage covariance, whitening, threshold."""

from __future__ import annotations

import numpy as np
import pytest

from spine_edge.errors import SpineEdgeError
from spine_edge.export.ood import choose_threshold, fit_gaussian, fit_ood, ledoit_wolf


def _features(n: int, c: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Correlated, anisotropic features, like pooled CNN activations (non-negative after ReLU + mean).
    mixing = rng.normal(size=(c, c)) / np.sqrt(c)
    return np.abs(rng.normal(size=(n, c)) @ mixing + 1.0) + shift


def test_ledoit_wolf_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    x = _features(40, 64, seed=1)  # fewer images than features, as at export
    centred = x - x.mean(axis=0)
    ours, alpha = ledoit_wolf(centred)
    theirs, their_alpha = covariance.ledoit_wolf(x)
    assert alpha == pytest.approx(their_alpha, rel=1e-9)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_whitened_score_is_the_mahalanobis_distance_per_feature() -> None:
    x = _features(300, 12, seed=2)
    fit = fit_gaussian(x)
    cov, _ = ledoit_wolf(x - x.mean(axis=0))
    probe = _features(5, 12, seed=3)
    diff = probe - x.mean(axis=0)
    expected = np.einsum("nc,cd,nd->n", diff, np.linalg.inv(cov), diff) / 12
    np.testing.assert_allclose(fit.score(probe), expected, rtol=1e-8)
    # On its own training images the mean of d²/C is below 1 (shrinkage inflates the covariance).
    assert 0.5 < fit.score(x).mean() <= 1.0


def test_score_separates_shifted_features_and_threshold_keeps_validation() -> None:
    train, val = _features(200, 32, seed=4), _features(100, 32, seed=5)
    ood = _features(50, 32, seed=6, shift=1.5)
    model = fit_ood([train, train[:, :16]])  # two members of different widths
    scores = {name: model.score([f, f[:, :16]]) for name, f in (("train", train), ("val", val), ("ood", ood))}
    chosen = choose_threshold(scores["val"], scores["train"])
    assert chosen.n_val == 100 and chosen.percentile == 99.0
    assert (scores["val"] > chosen.threshold).mean() <= 0.02
    assert (scores["ood"] > chosen.threshold).all()
    # The member average keeps in-distribution scores near 1 whatever the widths.
    assert 0.5 < chosen.val_median < 2.0


def test_more_features_than_images_still_invertible() -> None:
    fit = fit_gaussian(_features(10, 100, seed=7))
    assert 0 < fit.shrinkage <= 1
    assert np.isfinite(fit.score(_features(3, 100, seed=8))).all()


def test_refuses_what_cannot_be_fitted() -> None:
    with pytest.raises(SpineEdgeError, match="at least 2 training images"):
        fit_gaussian(np.zeros((1, 8)))
    with pytest.raises(SpineEdgeError, match="not finite"):
        fit_gaussian(np.full((4, 2), np.nan))
    with pytest.raises(SpineEdgeError, match="validation images"):
        choose_threshold(np.array([1.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="members"):
        fit_ood([_features(5, 4, seed=0)]).score([])


def test_fitted_threshold_is_a_steadier_percentile_than_the_sample_one() -> None:
    # Scores of 20 validation images from a log-normal law whose 99th percentile is known exactly.
    rng = np.random.default_rng(9)
    truth = float(np.exp(2.3263478740408408 * 0.4))
    fitted, sample = [], []
    for _ in range(200):
        chosen = choose_threshold(np.exp(rng.normal(0, 0.4, 20)), np.ones(3))
        fitted.append(chosen.threshold)
        sample.append(chosen.empirical)
        assert chosen.threshold >= chosen.empirical
    # The sample percentile of 20 images sits near their maximum: often below the true percentile.
    assert np.mean(np.array(sample) < truth) > 0.5
    assert np.mean(np.array(fitted) < truth) < np.mean(np.array(sample) < truth)


def _split_canvases(prepared, split: str, size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    from spine_edge.imageio import read_image
    from spine_edge.preprocess import letterbox

    paths = sorted((prepared / "images" / split).glob("*.png"))
    return np.stack([letterbox(read_image(p).image, size, 0)[0] for p in paths])[:, None]


def test_the_graph_computes_the_fitted_score(export_checkpoints, export_prepared, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The traced classifier's ``ood_score`` is the numpy fit's score, and adding it leaves prob and CAM alone."""
    pytest.importorskip("torch")
    from spine_edge.export.classifier_graph import (
        attach_ood,
        build_ensemble,
        export_classifier_graph,
        pooled_features,
        read_ensemble_spec,
        run_ensemble,
        run_ood,
    )
    from spine_edge.export.evaluation import run_graph
    from spine_edge.export.ood import fit_ood

    spec = read_ensemble_spec(export_checkpoints)
    ensemble = build_ensemble(spec)
    train = _split_canvases(export_prepared, "train", spec.input_size)
    val = _split_canvases(export_prepared, "val", spec.input_size)
    before_prob, before_cam = run_ensemble(ensemble, val)
    chosen = attach_ood(ensemble, train, val)
    val_features = pooled_features(ensemble, val)
    # Members weighed by their validation scores' spread, as attach_ood fits them.
    expected = fit_ood(pooled_features(ensemble, train), val_features).score(val_features)
    np.testing.assert_allclose(run_ood(ensemble, val), expected, rtol=1e-4)
    path = export_classifier_graph(ensemble, tmp_path / "classifier.onnx", spec.input_size)
    got = run_graph(path, val, ["prob", "cam", "ood_score"], 8)
    np.testing.assert_allclose(got["ood_score"], expected, rtol=1e-3)
    np.testing.assert_allclose(got["prob"], before_prob, atol=1e-5)
    np.testing.assert_allclose(got["cam"], before_cam, atol=1e-5)
    assert chosen.n_val == len(val) and chosen.threshold >= np.percentile(expected, 99) - 1e-9


def test_export_writes_the_score_and_its_threshold(exported_bundle) -> None:  # type: ignore[no-untyped-def]
    from spine_edge.bundle import load_manifest

    folder, _ = exported_bundle
    manifest = load_manifest(folder)
    ood = manifest.classifier.ood
    assert ood is not None and ood.n_val == 16 and ood.percentile == 99.0
    assert ood.threshold >= (ood.val_median or 0) > 0
    for entry in (e for e in manifest.models if e.role == "classifier"):  # every precision carries the score
        assert entry.output("ood_score").shape == ("batch",)
    # Each lower-precision graph has its own threshold, from its own validation scores.
    lower = {e.file for e in manifest.models if e.role == "classifier" and e.precision != "fp32"}
    assert lower and set(ood.per_graph) == lower
    assert all(value > 0 for value in ood.per_graph.values())
    assert ood.threshold_for("classifier.fp32.onnx") == ood.threshold
    for name, value in ood.per_graph.items():
        assert ood.threshold_for(name) == value and ood.threshold_for(f"cpu/{name}") == value


def test_the_cascade_uses_the_threshold_of_the_graph_it_runs() -> None:
    from spine_edge.bundle import BuildInfo, ModelEntry, OodInfo, graph_source

    ood = OodInfo(threshold=0.10, percentile=99.0, n_val=100, per_graph={"classifier.int8.trt.onnx": 0.14})
    plain = ModelEntry("classifier", "int8", "onnx", "classifier.int8.trt.onnx", "0" * 64, (), (), "tensorrt")
    built = ModelEntry(
        "classifier", "int8", "onnx", "cpu/classifier.int8.abc.opt.onnx", "0" * 64, (), (), "tensorrt",
        build=BuildInfo(builder="onnxruntime", builder_version="1", device="cpu", source="classifier.int8.trt.onnx"),
    )  # fmt: skip
    assert ood.threshold_for(graph_source(plain)) == ood.threshold_for(graph_source(built)) == 0.14
    assert ood.threshold_for("classifier.fp16.onnx") == 0.10  # no threshold of its own: FP32's


def test_validation_weights_damp_an_unstable_member_and_fold_into_the_whitening() -> None:
    train, val = _features(200, 16, seed=11), _features(60, 16, seed=12)
    rng = np.random.default_rng(13)
    # The second member's validation features have a heavy tail its training features lack.
    unstable_val = val + rng.standard_t(1.5, size=val.shape) * 0.5
    equal = fit_ood([train, train])
    weighted = fit_ood([train, train], [val, unstable_val])
    weights = [fit.weight for fit in weighted.members]
    assert [fit.weight for fit in equal.members] == [1.0, 1.0]
    assert sum(weights) == pytest.approx(2.0) and weights[0] > 5 * weights[1]
    probe = _features(4, 16, seed=14)
    per_member = [fit.score(probe) for fit in equal.members]
    np.testing.assert_allclose(
        weighted.score([probe, probe]), weights[0] * per_member[0] + weights[1] * per_member[1], rtol=1e-9
    )
    assert weighted.score([val, unstable_val]).std() < equal.score([val, unstable_val]).std()
    with pytest.raises(ValueError, match="2 members"):
        fit_ood([train, train], [val])


def test_member_weights_fall_back_to_equal_without_spread() -> None:
    from spine_edge.export.ood import member_weights

    np.testing.assert_allclose(member_weights([np.ones(5), np.arange(5.0)]), [1.0, 1.0])
    np.testing.assert_allclose(member_weights([np.arange(5.0), 2 * np.arange(5.0)]), [1.6, 0.4])

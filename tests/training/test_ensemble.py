"""Ensemble weight search, Youden threshold, ensemble.json, and the `spine-edge train` CLI."""

from __future__ import annotations

import itertools
import json
import shutil
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from spine_edge.cli import EXIT_SETUP, EXIT_USAGE, main
from spine_edge.metrics import evaluate_classification
from spine_edge.training.checkpoints import CheckpointError
from spine_edge.training.datasets import ClassificationDataset, read_prepared
from spine_edge.training.ensemble import (
    choose_weights,
    collect_val_probs,
    grid_search_weights,
    load_dernet,
    simplex_grid,
    train_ensemble,
    youden_threshold,
)
from spine_edge.training.profiles import get_profile
from spine_edge.tta import DEFAULT_VIEWS
from tests.training.conftest import write_prepared_cache

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_ARCHS = [recipe.arch for recipe in get_profile("tiny").classifiers]


def _brute_force(probs: np.ndarray, labels: np.ndarray, step: float) -> tuple[tuple[float, ...], float]:
    k = round(1 / step)
    scored = []
    for counts in itertools.product(range(k + 1), repeat=probs.shape[0]):
        if sum(counts) == k:
            scored.append((roc_auc_score(labels, (np.array(counts) / k) @ probs), counts))
    best = max(a for a, _ in scored)
    tied = [c for a, c in scored if a >= best - 1e-12]
    chosen = min(tied, key=lambda c: (sum(x * x for x in c), tuple(-x for x in c)))
    return tuple(c / k for c in chosen), best


@pytest.mark.parametrize(("members", "step", "seed"), [(3, 0.05, 0), (3, 0.1, 1), (2, 0.05, 2), (4, 0.25, 3)])
def test_grid_search_equals_brute_force(members: int, step: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    # Members of different quality, so the optimum is not at the uniform point.
    probs = np.clip(labels * rng.uniform(0.05, 0.4, (members, 1)) + rng.normal(0, 0.3, (members, 40)), 0, 1)
    weights, auroc = grid_search_weights(probs, labels, step)
    expected_weights, expected_auroc = _brute_force(probs, labels, step)
    assert auroc == pytest.approx(expected_auroc, abs=1e-12)
    assert weights == pytest.approx(expected_weights, abs=1e-12)
    assert sum(weights) == pytest.approx(1.0)


def test_simplex_grid_enumerates_every_composition() -> None:
    grid = simplex_grid(3, 0.05)
    assert grid.shape == (comb(22, 2), 3) == (231, 3)
    assert (grid.sum(axis=1) == 20).all() and len({tuple(r) for r in grid}) == 231
    with pytest.raises(ValueError, match="divide"):
        simplex_grid(3, 0.3)


def test_ties_prefer_the_most_uniform_then_earlier_members() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0])
    same = np.array([0.2, 0.7, 0.3, 0.9, 0.6, 0.1])
    assert grid_search_weights(np.stack([same, same]), labels, 0.1) == ((0.5, 0.5), 1.0)
    assert grid_search_weights(np.stack([same, same, same]), labels, 0.05)[0] == (0.35, 0.35, 0.3)


def test_youden_threshold_on_a_hand_made_case() -> None:
    # Thresholds 0.9 .8 .6 .35 .3 .1 give J = 1/3, 2/3, 1/3, 2/3, 1/3, 0: a tie between 0.8 and 0.35,
    # and the lower (more sensitive) one wins.
    probs = np.array([0.1, 0.3, 0.35, 0.6, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    tau = youden_threshold(probs, labels)
    assert tau == 0.35
    m = evaluate_classification(labels, probs, tau)
    assert (m.sensitivity, m.specificity) == (1.0, pytest.approx(2 / 3))
    assert youden_threshold(np.array([0.2, 0.4, 0.6, 0.7]), np.array([0, 0, 1, 1])) == 0.6
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold(probs, np.zeros(6))


@pytest.fixture(scope="module")
def cli_run(single_thread: None, tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("ckpt")
    runner = CliRunner()
    common = ["--profile", "tiny", "--data", str(tiny_prepared), "--out", str(out)]
    results = [
        runner.invoke(main, ["train", "classifier", *common]),
        runner.invoke(main, ["train", "ensemble", *common]),
    ]
    return out, results


def test_cli_trains_classifiers_and_the_ensemble(cli_run: tuple[Path, list], tiny_prepared: Path) -> None:
    out, (classifiers, ensemble) = cli_run
    assert classifiers.exit_code == 0, classifiers.output
    assert ensemble.exit_code == 0, ensemble.output
    for arch in TINY_ARCHS:
        assert (out / f"classifier_{arch}.pt").is_file() and (out / "resume" / f"classifier_{arch}.pt").is_file()
        assert (out / "logs" / f"{arch}.csv").is_file()
        assert f"classifier {arch}: best val AUROC" in classifiers.output
    assert "ensemble: weights" in ensemble.output and "threshold" in ensemble.output

    document = json.loads((out / "ensemble.json").read_text())
    assert [m["arch"] for m in document["members"]] == TINY_ARCHS
    assert [m["checkpoint"] for m in document["members"]] == [f"classifier_{a}.pt" for a in TINY_ARCHS]
    weights = np.array([m["weight"] for m in document["members"]])
    search = document["search"]
    assert weights.sum() == pytest.approx(1.0)
    # 12 val images: no grid optimum beats the prior beyond chance there, so the profile's weights stay.
    assert search["chosen"] == "prior" and weights.tolist() == search["default_weights"]
    grid = np.array(search["grid_weights"])
    assert np.allclose(grid * 20, np.round(grid * 20)) and search["grid_gain_ci_pt"][0] <= 0
    assert document["tta_views"] == [v.name for v in DEFAULT_VIEWS] and document["input_size"] == 64
    assert set(document["metrics"]) == {"ensemble", *TINY_ARCHS}
    assert document["search"]["candidates"] == 231 and document["search"]["n"] == 12
    assert document["data_fingerprint"] == read_prepared(tiny_prepared).fingerprint

    # The recorded numbers are recomputable from the checkpoints with the TTA module.
    predictions = collect_val_probs(tiny_prepared, [out / f"classifier_{a}.pt" for a in TINY_ARCHS])
    ensemble_probs = weights @ predictions.probs
    assert document["threshold"] == pytest.approx(youden_threshold(ensemble_probs, predictions.labels), abs=1e-6)
    assert document["metrics"]["ensemble"]["auroc"] == pytest.approx(
        roc_auc_score(predictions.labels, ensemble_probs), abs=1e-6
    )
    for member, row in zip(document["members"], predictions.probs):
        assert member["val_auroc"] == pytest.approx(roc_auc_score(predictions.labels, row), abs=1e-6)


def test_loaded_ensemble_module_computes_the_searched_probabilities(
    cli_run: tuple[Path, list], tiny_prepared: Path
) -> None:
    out, _ = cli_run
    document = json.loads((out / "ensemble.json").read_text())
    kept = [m for m in document["members"] if m["weight"] > 0]
    module = load_dernet(out)
    assert len(module.members) == len(kept)
    predictions = collect_val_probs(tiny_prepared, [out / m["checkpoint"] for m in kept])
    images = ClassificationDataset(read_prepared(tiny_prepared).split("val"), 64).images
    with torch.no_grad():
        prob, cam = module(images)
    expected = np.array([m["weight"] for m in kept]) @ predictions.probs
    np.testing.assert_allclose(prob.numpy(), expected, atol=1e-5)
    assert cam.shape == (12, 2, 2) and float(cam.min()) >= 0 and float(cam.max()) <= 1


def test_ensemble_refuses_checkpoints_from_other_data(cli_run: tuple[Path, list], tmp_path: Path) -> None:
    out, _ = cli_run
    other = write_prepared_cache(tmp_path / "other", {"train": 4, "val": 4}, long_side=64, seed=9)
    with pytest.raises(CheckpointError, match="another prepared cache"):
        train_ensemble(other, out, get_profile("tiny"))


def test_ensemble_names_missing_members(tiny_prepared: Path, tmp_path: Path, cli_run: tuple[Path, list]) -> None:
    out, _ = cli_run
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(out / f"classifier_{TINY_ARCHS[0]}.pt", partial)
    result = CliRunner().invoke(
        main, ["train", "ensemble", "--profile", "tiny", "--data", str(tiny_prepared), "--out", str(partial)]
    )
    assert result.exit_code == EXIT_SETUP
    assert (
        f"classifier_{TINY_ARCHS[1]}.pt" in result.output
        and "spine-edge train classifier --profile tiny" in result.output
    )


def test_cli_rejects_an_unknown_profile_or_arch(tiny_prepared: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["--data", str(tiny_prepared), "--out", str(tmp_path)]
    bad_profile = runner.invoke(main, ["train", "classifier", "--profile", "huge", *common])
    assert bad_profile.exit_code == EXIT_USAGE and "unknown profile 'huge'" in bad_profile.output
    bad_arch = runner.invoke(main, ["train", "classifier", "--profile", "tiny", "--arch", "resnet50", *common])
    assert bad_arch.exit_code == EXIT_USAGE and "has no classifier 'resnet50'" in bad_arch.output


def test_the_grid_optimum_is_kept_only_when_its_gain_is_beyond_chance() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    signal = labels + rng.normal(0, 0.8, labels.size)  # one informative score
    # Three equally informative members: the grid's optimum is luck, and the prior stays.
    alike = np.stack([labels + rng.normal(0, 0.8, labels.size) for _ in range(3)])
    kept = choose_weights(alike, labels, 0.05, (0.42, 0.32, 0.26))
    assert kept.source == "prior" and kept.weights == (0.42, 0.32, 0.26)
    assert kept.gain_pt >= 0 and kept.gain_low_pt <= 0 <= kept.gain_high_pt
    # One informative member and two that are noise: the prior's weight on noise costs AUROC beyond chance.
    mixed = np.stack([rng.normal(0, 1, labels.size), rng.normal(0, 1, labels.size), signal])
    chosen = choose_weights(mixed, labels, 0.05, (0.42, 0.32, 0.26))
    assert chosen.source == "grid" and chosen.weights == chosen.grid_weights and chosen.weights[2] >= 0.8
    assert chosen.gain_low_pt > 0
    # A prior that does not fit the members leaves the grid's optimum.
    assert choose_weights(mixed, labels, 0.05, ()).source == "grid"

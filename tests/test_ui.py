"""The MLflow UI as a user sees it, in a real headless Chromium: two tiny pipeline runs with different params
on a real ``mlflow server`` (tests/support/ui.py); each check reads the page, not the REST API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import browser
from tests.support.engines import missing
from tests.support.ui import MODEL, Comparison, comparison

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Comparison]:
    if reason := browser.missing_reason():
        missing(reason)
    with comparison(Path(tmp_path_factory.mktemp("ui"))) as c:
        yield c


@pytest.fixture(scope="module")
def chromium(ui: Comparison) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = browser.launch_chromium(pw)
        yield launched
        launched.close()


def test_an_experiment_opens_in_the_genai_view_and_model_training_is_one_click_away(ui: Comparison, chromium) -> None:
    """What docs/mlflow.md tells a new user: MLflow 3's UI opens an experiment in its GenAI view; the
    "Model training" switch shows the training runs."""
    page = browser.new_page(chromium)
    assert browser.check_experiment_default_view(page, ui.uri, ui.experiment_id) in ("genai-overview", "runs")
    browser.open_training_runs_like_a_user(page, ui.uri, ui.experiment_id)


def test_the_training_runs_list_shows_both_pipeline_runs_with_their_stages_nested(ui: Comparison, chromium) -> None:
    assert list(ui.parents) == ["pipeline", "ridge-2"]
    assert len(ui.children["pipeline"]) == 7 and "evaluate" in ui.children["ridge-2"]
    browser.check_runs_list(browser.new_page(chromium, workflow="machine_learning"), ui.uri, ui.experiment_id,
                            ui.parents, ui.children)  # fmt: skip


def test_the_compare_page_shows_the_changed_params_and_both_test_accuracies(ui: Comparison, chromium) -> None:
    assert set(ui.changed) == {"baselines.ridge.alpha", "train_cnn.epochs"}
    assert {"evaluate.cnn.test_accuracy", "evaluate.ridge.test_accuracy"} <= set(ui.metrics)
    page = browser.new_page(chromium, workflow="machine_learning")
    browser.check_compare(page, ui.uri, ui.experiment_id, ui.parents, ui.changed, ui.metrics)


def test_the_registered_model_page_shows_the_champion_on_the_rules_version(ui: Comparison, chromium) -> None:
    from mlflow.tracking import MlflowClient

    from stages.lib import registry

    versions = registry.read_versions(MlflowClient(tracking_uri=ui.uri), MODEL)
    assert len(versions) == 2  # the second run trained another CNN
    assert ui.aliases == {alias: str(v) for alias, v in registry.aliases_of(registry.walk(versions)).items()}
    browser.check_model_aliases(browser.new_page(chromium, workflow="machine_learning"), ui.uri, MODEL, ui.aliases)

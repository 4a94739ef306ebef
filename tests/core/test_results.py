"""The gate's result, typed and rendered once (transferkit.core.results): the CLI, the Prefect artifact and the
model card take the verdict line, the advice and the baseline table from one place."""

from __future__ import annotations

from transferkit.core.results import GateResult, md_cell
from transferkit.export.card import transfer_record

VALIDATION = {
    "passed": False,
    "verdict": "negative transfer",
    "verdict_message": "transfer does not help | here",
    "transfer_gain": -0.027,
    "gain_interval": [-0.048, -0.006],
    "gain_p_value": 0.0163,
    "gain_metric": "balanced_accuracy",
    "test_accuracy": 0.913,
    "val_accuracy": 0.91,
    "baselines": [
        {
            "name": "small-cnn",
            "description": "small CNN from scratch",
            "strategy": "scratch",
            "model": "cnn",
            "val_accuracy": 0.96,
            "test_accuracy": 0.94,
            "gain": -0.027,
            "interval": [-0.048, -0.006],
            "p_value": 0.016,
        },
        {
            "name": "pixels-knn",
            "description": "raw-pixel kNN",
            "strategy": "pixels",
            "model": "knn",
            "val_accuracy": 0.1,
            "test_accuracy": 0.1,
            "gain": 0.813,
            "interval": None,
            "p_value": None,
            "broken": True,
        },
        {"name": "pixels-svm", "strategy": "pixels", "model": "svm", "test_accuracy": None},
    ],
    "recommendation": {"better_model": "small CNN", "likely_reason": "severe domain shift", "options": ["a", "b"]},
}


def test_the_verdict_line_names_the_metric_the_interval_and_p():
    g = GateResult.from_validation(VALIDATION)
    assert (
        g.verdict_line()
        == "negative transfer on balanced accuracy (skewed train labels) (CI [-0.048, -0.006], p = 0.016)"
    )
    plain = GateResult.from_validation({**VALIDATION, "gain_metric": "accuracy", "gain_interval": None})
    assert plain.verdict_line() == "negative transfer"


def test_advice_and_table():
    g = GateResult.from_validation(VALIDATION)
    assert g.advice() == [
        "better model here: small CNN",
        "likely reason: severe domain shift",
        "option: a",
        "option: b",
    ]
    table = g.baseline_table()
    assert len(table) == 2 + 1 + 3  # header, rule, this model, one row per baseline
    assert table[2] == "| **this model** | 91.0% | 91.3% | | | |"
    assert "| small CNN from scratch | 96.0% | 94.0% | -2.7 points | [-4.8, -0.6] | 0.016 |" in table
    assert "raw-pixel kNN (broken: at chance, not the bar)" in table[4] and table[4].endswith("| - | - |")
    assert table[5].startswith("| pixels-svm (`svm`) | n/a")


def test_the_card_record_renders_what_validation_json_renders():
    """export keeps a `transfer` record in metadata.json; the card rendered from it says what validation.json says."""
    a = GateResult.from_validation(VALIDATION).markdown()
    b = GateResult.from_transfer(transfer_record(VALIDATION)).markdown()
    assert a == b and "transfer does not help \\| here" in a[2]


def test_md_cell_keeps_a_table_row_one_row():
    assert md_cell("a|b\nc") == "a\\|b c"

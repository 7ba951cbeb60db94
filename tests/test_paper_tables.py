"""bench/paper_tables.py on Fashion-MNIST: the paper's FM rows as reference data, the tables that
put ours beside them, and the job config that carries the stated grids into compare."""
from __future__ import annotations

import json

import pytest

from bench import paper_tables as pt
from bench.paper_reference import TABLE2_FM, TABLE3_FM


def test_paper_rows_are_read_in_the_papers_column_order():
    # Table 2: VGG16/FM, BIM block starts "62.0 66.8 ..." (DARE, then BIM, CW, FGSM, JSMA, PGD);
    # Alexnet/FM's last value is the PGD baseline on PGD examples.
    assert TABLE2_FM["vgg16"]["bim"] == {"dare": 62.0, "at_bim": 66.8, "at_cw": 65.9,
                                         "at_fgsm": 61.4, "at_jsma": 60.8, "at_pgd": 68.8}
    assert TABLE2_FM["vgg19"]["jsma"]["at_cw"] == 84.8
    assert TABLE2_FM["alexnet"]["pgd"]["at_pgd"] == 80.2
    assert TABLE3_FM["vgg19"] == {"original": 90.2, "dare": 91.4, "at_bim": 89.7, "at_cw": 81.1,
                                  "at_fgsm": 90.5, "at_jsma": 89.2, "at_pgd": 89.5}


def test_the_papers_fm_scenario_wins():
    # counted by hand from Table 2's FM rows: DARE wins four of Alexnet's five scenarios only
    w = pt.paper_wins()
    assert w["scenarios"] == 15
    assert w["wins"] == {"dare": 4, "at_bim": 0, "at_cw": 3, "at_fgsm": 2, "at_jsma": 2,
                         "at_pgd": 4}


def _ev(er: dict, clean: dict) -> dict:
    """An evaluation.json as the engine writes it, with the same ER for every attack."""
    per_model = {m: {"transfer_er": v, "adaptive_accuracy": v / 2} for m, v in er.items()}
    return {"clean": clean, "attacks": {a: {"original_accuracy": 0.1, "per_model": per_model}
                                        for a in pt.ATTACKS}}


def _result(er: dict) -> dict:
    clean = {"original": 0.9, **{m: 0.85 for m in er}}
    clean["at_cw"] = 0.7  # over the 10-point budget
    ev = _ev(er, clean)
    return {"arch": "vgg16", "dataset": "fashion", "train": {"test_accuracy": 0.9, "parameters": 1000},
            "methods": list(er), "chosen_points": {"dare": {"epochs": 5, "lr": 0.003, "q": 0.95,
                                                            "val_clean": 0.8, "val_robust": 0.3}},
            "fixed_eps": {"evaluation": ev}, "minimal": {"evaluation": ev}}


def test_our_table_sits_beside_the_papers_and_controls_count_only_where_named():
    er = {"dare": 0.5, "at_bim": 0.6, "at_cw": 0.2, "at_fgsm": 0.6, "at_jsma": 0.1, "at_pgd": 0.4,
          "finetune_mined": 0.3, "weight_noise": 0.7}
    results = [_result(er)]
    text = pt.table_er_beside_paper(results, "fixed_eps", "transfer_er")
    rows = text.splitlines()[2:]
    assert rows[0] == ("| vgg16/fashion | bim | ours | (10.0) | 50.0 | **60.0** | 20.0 | **60.0** "
                       "| 10.0 | 40.0 | 30.0 | 70.0 |")
    assert rows[1] == "| | | paper | - | 62.0 | 66.8 | 65.9 | 61.4 | 60.8 | **68.8** | n/a | n/a |"
    # the adaptive table has no paper rows (the paper has no adaptive figures)
    assert "paper" not in pt.table_er_beside_paper(results, "fixed_eps", "adaptive_accuracy")
    six = pt.our_wins(results, "fixed_eps", "transfer_er", pt.PAPER)
    with_controls = pt.our_wins(results, "fixed_eps", "transfer_er", pt.PAPER + pt.CONTROLS)
    # a tie is a win for each tied method
    assert six["wins"]["at_bim"] == six["wins"]["at_fgsm"] == 5 and six["scenarios"] == 5
    assert with_controls["wins"]["weight_noise"] == 5 and with_controls["wins"]["at_bim"] == 0
    clean = pt.table_clean_beside_paper(results, "fixed_eps", 0.10).splitlines()
    assert clean[2].startswith("| vgg16/fashion | ours | 90.0 | 85.0 | 85.0 | 70.0* |")
    assert clean[3].startswith("| | paper | 91.1 | 90.8 | 86.3 | 85.1 |")
    assert "epochs 5, lr 0.003, q 0.95 (val 80.0/30.0)" in pt.table_chosen(results)


def test_fashion_settings_reach_compare_through_selection():
    """The stated grids are the ones compare trains (grid_for reads config.selection), and the job
    splits the data as the reference was trained (val_fraction), attacked by the five attacks."""
    from worker.engine.methods import REGISTRY
    from worker.engine.selection import grid_for

    s = pt.FASHION
    cfg = pt._config("minimal", s, "fashion")
    assert grid_for(REGISTRY["dare"], cfg) == s["grids"]["dare"]
    assert grid_for(REGISTRY["at_fgsm"], cfg) == s["grids"]["adversarial"]
    assert grid_for(REGISTRY["at_pgd_online"], cfg)["epochs"] == [2]
    assert cfg.val_fraction == 0.5 and cfg.selection.n_val == s["n_val"]
    assert cfg.evaluation.attacks == list(pt.ATTACKS) and cfg.evaluation.protocol == "minimal"
    text = pt._grids_text(s, "fashion")
    assert "epochs [3, 6]" in text and "at_pgd_online: epochs [2]" in text


@pytest.mark.slow
def test_quick_fashion_run_writes_both_tables(tmp_path):
    from worker.engine.data import fashion_dir

    if not (fashion_dir() / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    out = tmp_path / "fm.md"
    assert pt.main(["--dataset", "fashion", "--quick", "--jobs", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| alexnet/fashion | bim | ours |" in text and "| | | paper |" in text
    assert "Scenario wins in the paper's FM rows" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["settings"]["width"] == pt.FASHION_QUICK["width"]
    assert "weight_noise" in saved["results"][0]["fixed_eps"]["evaluation"]["clean"]

"""The DARE paper's published Fashion-MNIST (FM) rows, as reference data for the benchmark.

Source: Zhang et al., "Improving the Universal Robustness of Deep Learning Models via Model
Transformation" / DARE, ASE 2022 (text in /work/shared/reference/dare-paper-ase22.txt):

- ``TABLE2_FM``: Table 2, "Performance comparison regarding Empirical Robustness (i.e., test
  accuracy/%) when attacking by different methods", rows VGG16/FM, VGG19/FM, Alexnet/FM. Per
  attack block (BIM, CW, FGSM, JSMA, PGD) the columns are DARE and the five adversarial-training
  baselines in the paper's order BIM, CW, FGSM, JSMA, PGD. The paper's ER is the transfer
  figure: fine-tuned models tested on 5,000 examples made against the original model.
- ``TABLE3_FM``: Table 3, "Model accuracy (%) over the original testing data before and after
  fine-tuning for each method", the same three rows.
- ``TABLE1_FM``: Table 1's parameter counts and test accuracy of the three FM subjects.

Copied by hand from the paper's text; the row strings below are the paper's numbers in its column
order, so a reader can check them against the PDF line by line.
"""
from __future__ import annotations

ATTACKS = ("bim", "cw", "fgsm", "jsma", "pgd")
# the paper's column order inside each attack block, as our method names
METHODS = ("dare", "at_bim", "at_cw", "at_fgsm", "at_jsma", "at_pgd")
ARCHS = ("vgg16", "vgg19", "alexnet")

_TABLE2_ROWS = {
    "vgg16": "62.0 66.8 65.9 61.4 60.8 68.8 81.8 71.3 83.1 68.4 81.2 75.8 66.8 73.3 66.8 78.5 "
             "67.8 77.6 71.8 77.2 70.2 75.4 86.6 84.4 63.7 67.1 64.6 62.1 64.3 69.9",
    "vgg19": "66.1 69.5 66.8 66.6 69.6 72.1 79.6 67.5 86.9 66.9 67.2 76.5 73.8 74.7 71.4 77.3 "
             "74.8 76.1 77.9 75.8 84.8 78.5 75.6 77.1 72.5 70.3 72.9 69.7 75.1 74.7",
    "alexnet": "83.4 64.9 78.8 52.9 67.3 71.3 77.1 84.1 54.6 81.4 86.1 87.0 72.1 63.3 66.3 63.0 "
               "62.5 65.8 86.2 67.3 80.7 55.9 80.2 81.6 84.4 76.4 80.1 54.8 69.7 80.2",
}
# Original Acc, then DARE, BIM, CW, FGSM, JSMA, PGD
_TABLE3_ROWS = {"vgg16": "91.1 90.8 86.3 85.1 86.5 81.9 87.1",
                "vgg19": "90.2 91.4 89.7 81.1 90.5 89.2 89.5",
                "alexnet": "90.0 91.7 86.7 90.2 88.1 90.0 88.7"}

TABLE1_FM = {"vgg16": {"parameters": 26.6e6, "test_accuracy": 91.1},
             "vgg19": {"parameters": 33.6e6, "test_accuracy": 90.2},
             "alexnet": {"parameters": 8.1e6, "test_accuracy": 90.0}}


def _table2() -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for arch, row in _TABLE2_ROWS.items():
        vals = [float(v) for v in row.split()]
        assert len(vals) == len(ATTACKS) * len(METHODS)
        out[arch] = {a: dict(zip(METHODS, vals[i * len(METHODS):(i + 1) * len(METHODS)]))
                     for i, a in enumerate(ATTACKS)}
    return out


def _table3() -> dict[str, dict[str, float]]:
    out = {}
    for arch, row in _TABLE3_ROWS.items():
        vals = [float(v) for v in row.split()]
        out[arch] = {"original": vals[0], **dict(zip(METHODS, vals[1:]))}
    return out


TABLE2_FM = _table2()  # {arch: {attack: {method: ER %}}}
TABLE3_FM = _table3()  # {arch: {"original" | method: clean accuracy %}}

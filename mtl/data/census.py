"""Census-Income (KDD) as in the MMoE paper (Ma et al., KDD 2018, §5.2).

UCI data set 117 (CC BY 4.0; cite it with reported results): 199,523 train and 99,762 test rows,
42 comma-separated columns, label last. Tasks: ``income`` (> 50K), ``marital`` (never married) and
``education`` (at least a college degree: associates or higher, the values in COLLEGE). Over all
rows |Pearson r| is 0.239 for education/marital and 0.178 for income/marital (paper: 0.2373 and
0.1768). The paper's two groups are GROUPS "group1" = (income, marital) and "group2" = (education,
marital); the paper splits the test file 1:1 into validation and test (``val_from="test"``);
``val_from="train"`` carves validation from train instead.

Features: the 7 numeric columns standardized with the training rows' mean and std (dense [n, 1]);
every other column a categorical id, vocabulary built on the training rows, 0 the reserved id of
values unseen in training. Excluded from the features: the columns used as task labels, the income
label itself and ``instance_weight`` (UCI: not to be used by classifiers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.data import fetch
from mtl.data.batching import Dataset
from mtl.spec import FeatureSpec, TaskSpec, integer, real, unknown

COLUMNS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex",
    "union_member", "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses",
    "stock_dividends", "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat",
    "det_hh_summ", "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same",
    "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father", "country_mother",
    "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits", "weeks_worked",
    "year", "income_50k",
)  # fmt: skip
NUMERIC = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
    "weeks_worked",
)  # fmt: skip
IGNORED = ("instance_weight",)
LABEL = "income_50k"
TASKS = ("income", "marital", "education")
GROUPS = {"group1": ("income", "marital"), "group2": ("education", "marital")}
TASK_COLUMN = {"income": LABEL, "marital": "marital_stat", "education": "education"}
COLLEGE = (
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)
POSITIVE = {"income": ("50000+.", "50000+"), "marital": ("Never married",), "education": COLLEGE}
FILES = ("census-income.data", "census-income.test")
VAL_FROM = ("test", "train")


def _read(path: Path) -> tuple[int, dict[str, np.ndarray], dict[str, tuple[np.ndarray, list[str]]]]:
    """Rows, numeric columns (float64) and the other columns as (codes, values) of one file."""
    if not path.is_file():
        raise fetch.MissingDataError(
            f"{path}: file not found (Census-Income); run `{fetch.fetch_command('census-income')}` "
            f"or pass path= to the directory holding {', '.join(FILES)}"
        )
    numeric = {c: [] for c in NUMERIC}
    cat_names = [c for c in COLUMNS if c not in NUMERIC]
    lookups: dict[str, dict[str, int]] = {c: {} for c in cat_names}
    codes: dict[str, list[int]] = {c: [] for c in cat_names}
    num_pos = [(COLUMNS.index(c), numeric[c], c) for c in NUMERIC]
    cat_pos = [(COLUMNS.index(c), lookups[c], codes[c]) for c in cat_names]
    n = 0
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(",")
            if len(parts) != len(COLUMNS):
                raise ValueError(
                    f"{path}:{lineno}: malformed row, expected {len(COLUMNS)} comma-separated "
                    f"fields, got {len(parts)}: {line[:120]!r}"
                )
            for i, out, name in num_pos:
                try:
                    out.append(float(parts[i]))
                except ValueError:
                    raise ValueError(
                        f"{path}:{lineno}: malformed row, column {name!r} value "
                        f"{parts[i].strip()!r} is not a number"
                    ) from None
            for i, lookup, out in cat_pos:
                v = parts[i].strip()
                out.append(lookup.setdefault(v, len(lookup)))
            n += 1
    nums = {c: np.asarray(v, np.float64) for c, v in numeric.items()}
    cats = {c: (np.asarray(codes[c], np.int64), list(lookups[c])) for c in cat_names}
    return n, nums, cats


def census_tasks(names: str | Sequence[str] = "group1") -> tuple[TaskSpec, ...]:
    """Binary TaskSpecs for a group name passed alone (GROUPS) or a sequence of task names (TASKS)."""
    if isinstance(names, str):
        if names not in TASKS and names not in GROUPS:
            raise unknown("task", names, TASKS + tuple(GROUPS))
        names = GROUPS.get(names, (names,))
    for n in names:
        if n in GROUPS:
            raise ValueError(
                f"task: {n!r} is a group name inside a sequence; group names are passed alone, "
                f"e.g. tasks={n!r}, or list its tasks: tasks={GROUPS[n]}"
            )
        if n not in TASKS:
            raise unknown("task", n, TASKS)
    return tuple(TaskSpec(n, "binary") for n in names)


def load_census(
    tasks: str | Sequence[str] = "group1",
    *,
    val_from: str = "test",
    val_fraction: float | None = None,
    seed: int = 42,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    embed_dim: int = 16,
) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test) Datasets; val is ``val_fraction`` (default 0.5 of test, 0.1 of train)."""
    task_specs = census_tasks(tasks)
    if val_from not in VAL_FROM:
        raise unknown("val_from", val_from, VAL_FROM)
    hint = "; pass a fraction in (0, 1) such as 0.5, or None for the default"
    frac = (
        (0.5 if val_from == "test" else 0.1)
        if val_fraction is None
        else real("val_fraction", val_fraction, hint)
    )
    if not 0.0 < frac < 1.0:
        raise ValueError(f"val_fraction: {val_fraction} must lie in (0, 1){hint}")
    seed = integer("seed", seed)
    d = (
        Path(path)
        if path is not None
        else fetch.ensure("census-income", data_dir, download=download)
    )
    n_train, num_tr, cat_tr = _read(d / FILES[0])
    n_test, num_te, cat_te = _read(d / FILES[1])
    perm = np.random.default_rng(seed).permutation(n_test if val_from == "test" else n_train)
    n_val = int(round(perm.size * frac))
    val_idx, rest = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if val_from == "test":
        parts = {"train": (0, np.arange(n_train)), "val": (1, val_idx), "test": (1, rest)}
    else:
        parts = {"train": (0, rest), "val": (0, val_idx), "test": (1, np.arange(n_test))}
    for name, (_, idx) in parts.items():
        if idx.size == 0:
            raise ValueError(
                f"split {name!r}: empty (train file {n_train} rows, test file {n_test} rows, "
                f"val_from={val_from!r}, val_fraction={frac}); use more rows or another fraction"
            )
    nums, cats = (num_tr, num_te), (cat_tr, cat_te)
    train_file, train_idx = parts["train"]
    drop = {TASK_COLUMN[t.name] for t in task_specs} | {LABEL, *IGNORED}
    features = {k: {} for k in parts}
    specs = []
    for col in COLUMNS:
        if col in drop:
            continue
        if col in NUMERIC:
            x_tr = nums[train_file][col][train_idx]
            mu, sd = x_tr.mean(), x_tr.std()
            sd = sd if sd > 0 else 1.0
            for k, (f, idx) in parts.items():
                features[k][col] = ((nums[f][col][idx] - mu) / sd).astype(np.float32)[:, None]
            specs.append(FeatureSpec(col, "dense", 1))
            continue
        codes_tr, values_tr = cats[train_file][col]
        vocab = sorted({values_tr[c] for c in np.unique(codes_tr[train_idx]).tolist()})
        ids = {v: i + 1 for i, v in enumerate(vocab)}
        for k, (f, idx) in parts.items():
            codes, values = cats[f][col]
            lut = np.asarray([ids.get(v, 0) for v in values], np.int32)
            features[k][col] = lut[codes[idx]]
        specs.append(FeatureSpec(col, "categorical", len(vocab) + 1, embed_dim))
    out = []
    for k, (f, idx) in parts.items():
        labels = {}
        for t in task_specs:
            codes, values = cats[f][TASK_COLUMN[t.name]]
            lut = np.asarray([v in POSITIVE[t.name] for v in values], np.float32)
            labels[t.name] = lut[codes[idx]]
        out.append(Dataset(features[k], labels, tuple(specs), task_specs))
    return tuple(out)

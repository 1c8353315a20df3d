"""The packaged nutrition knowledge base, its loader's errors, and the stage-file converter."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.data.kb_stages import (
    ConversionConfig,
    build_stage_examples,
    content_words,
    convert,
    main,
    rank_negatives,
    split_questions,
)
from clara.data.knowledge_base import (
    CATEGORIES,
    KB_DIR,
    TAG_FIELDS,
    DocumentTags,
    KBDocument,
    KnowledgeBaseError,
    QAPair,
    coverage_report,
    load_knowledge_base,
    load_vocabulary,
)

STAGE_FILES = [f"{stage}_{split}.jsonl" for stage in ("stage1", "stage1_2", "stage2") for split in ("train", "dev")]


def build_stage_rows(documents, config) -> dict[str, list[dict]]:
    """The JSON rows of each stage file, by file stem (stage1_train, ...)."""
    outputs = build_stage_examples(documents, config)
    return {f"{stage}_{split}": [e.to_json_dict() for e in examples] for (stage, split), examples in outputs.examples.items()}


@pytest.fixture(scope="module")
def documents() -> list[KBDocument]:
    return load_knowledge_base()


@pytest.fixture(scope="module")
def raw_rows() -> list[dict]:
    """The packaged documents as plain JSON, read without the loader under test."""
    lines = (KB_DIR / "documents.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def raw_vocabulary() -> dict:
    return json.loads((KB_DIR / "vocabulary.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- packaged content


def test_packaged_kb_has_at_least_150_documents_with_unique_ids(documents, raw_rows):
    assert len(documents) >= 150
    assert len(documents) == len(raw_rows)
    ids = [doc.id for doc in documents]
    assert len(set(ids)) == len(ids)
    # Numbered in file order, so the next free id is obvious to whoever adds a document.
    assert ids == [f"kb-{n:04d}" for n in range(1, len(ids) + 1)]


def test_every_document_has_two_or_three_short_grounded_questions(documents):
    for doc in documents:
        assert 2 <= len(doc.questions) <= 3, doc.id
        for qa in doc.questions:
            assert qa.question.endswith(("?", ".")) and len(qa.question.split()) >= 3, (doc.id, qa.question)
            assert len(qa.answer.split()) <= 25, (doc.id, qa.answer)
            # Answerable from the text alone: most content words of the answer occur in it
            # (allowing for a plural or -ed/-ing ending).
            stems = {_stem(w) for w in content_words(doc.title + " " + doc.text)}
            answer = {_stem(w) for w in content_words(qa.answer)}
            if answer:
                assert len(answer & stems) / len(answer) >= 0.6, (doc.id, qa.answer, answer - stems)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def test_questions_are_unique_across_the_kb(documents):
    # A question shared by two documents would have two right answers in retrieval.
    questions = [qa.question for doc in documents for qa in doc.questions]
    assert [q for q, n in Counter(questions).items() if n > 1] == []


def test_documents_are_80_to_200_words_with_distinct_texts_and_sources(documents):
    for doc in documents:
        assert 80 <= len(doc.text.split()) <= 200, (doc.id, len(doc.text.split()))
        assert doc.category in CATEGORIES
        assert len(doc.source) > 10, doc.id
    assert len({doc.text for doc in documents}) == len(documents)
    assert len({doc.title for doc in documents}) == len(documents)
    counts = Counter(doc.category for doc in documents)
    assert set(counts) == set(CATEGORIES)  # every category is used
    assert counts["interaction"] >= 40


def test_every_tag_is_a_canonical_term_of_its_vocabulary_kind(raw_rows, raw_vocabulary):
    kinds = raw_vocabulary["fields"]
    assert kinds == {"encourages": "intake", "restricts": "intake", "conditions": "condition",
                     "medications": "medication", "allergens": "allergen"}
    for row in raw_rows:
        assert set(row["tags"]) == set(TAG_FIELDS), row["id"]
        for field, terms in row["tags"].items():
            allowed = raw_vocabulary["kinds"][kinds[field]]["terms"]
            for term in terms:
                assert term in allowed, (row["id"], field, term)
                assert term == term.lower().strip(), (row["id"], term)


def test_vocabulary_synonyms_are_unique_within_each_kind(raw_vocabulary):
    for kind, entry in raw_vocabulary["kinds"].items():
        names = list(entry["terms"]) + [s for synonyms in entry["terms"].values() for s in synonyms]
        repeated = [name for name, count in Counter(names).items() if count > 1]
        assert repeated == [], (kind, repeated)


# Every interaction named in issue 4 point 5, as tag pairs a document must carry together.
BRIEF_INTERACTIONS = [
    ({"medications": "warfarin", "restricts": "vitamin k"}),
    ({"conditions": "ckd", "restricts": "potassium"}),
    ({"conditions": "ckd", "restricts": "phosphorus"}),
    ({"conditions": "ckd", "restricts": "sodium"}),
    ({"conditions": "ckd", "restricts": "protein"}),
    ({"medications": "maoi", "restricts": "tyramine"}),
    ({"medications": "statin", "restricts": "grapefruit"}),
    ({"medications": "cyclosporine", "restricts": "grapefruit"}),
    ({"medications": "tacrolimus", "restricts": "grapefruit"}),
    ({"conditions": "pregnancy", "restricts": "mercury"}),
    ({"conditions": "pregnancy", "restricts": "listeria"}),
    ({"conditions": "pregnancy", "restricts": "retinol"}),
    ({"conditions": "celiac disease", "restricts": "gluten"}),
    ({"conditions": "pku", "restricts": "phenylalanine"}),
    ({"conditions": "pku", "restricts": "aspartame"}),
    ({"conditions": "gout", "restricts": "purine"}),
    ({"conditions": "diabetes", "restricts": "added sugar"}),
    ({"conditions": "hypertension", "restricts": "sodium"}),
    ({"conditions": "heart failure", "restricts": "sodium"}),
    ({"conditions": "lactose intolerance", "restricts": "lactose"}),
    ({"medications": "levothyroxine", "restricts": "calcium"}),
    ({"medications": "levothyroxine", "restricts": "iron"}),
    ({"medications": "fluoroquinolone", "restricts": "calcium"}),
    ({"medications": "fluoroquinolone", "restricts": "magnesium"}),
    ({"medications": "fluoroquinolone", "restricts": "zinc"}),
    ({"medications": "tetracycline", "restricts": "calcium"}),
    ({"medications": "tetracycline", "restricts": "iron"}),
    ({"medications": "lithium", "restricts": "sodium"}),
    ({"medications": "spironolactone", "restricts": "salt substitute"}),
    ({"medications": "ace inhibitor", "restricts": "salt substitute"}),
    ({"medications": "arb", "restricts": "salt substitute"}),
    ({"conditions": "hemochromatosis", "restricts": "iron"}),
    ({"conditions": "hemochromatosis", "restricts": "vitamin c supplement"}),
    ({"conditions": "hemochromatosis", "restricts": "raw shellfish"}),
    ({"medications": "digoxin", "restricts": "licorice"}),
    ({"conditions": "kidney stone", "restricts": "oxalate"}),
] + [
    {"conditions": "food allergy", "allergens": allergen, "restricts": food}
    for allergen, food in [("peanut", "peanut"), ("tree nut", "tree nut"), ("milk", "dairy"), ("egg", "egg"),
                           ("shellfish", "shellfish"), ("fish", "fish"), ("soy", "soy"), ("wheat", "wheat"),
                           ("sesame", "sesame")]
]


@pytest.mark.parametrize("required", BRIEF_INTERACTIONS, ids=lambda r: "+".join(r.values()))
def test_each_required_interaction_has_a_document_tagged_for_it(documents, required):
    covering = [doc.id for doc in documents if all(term in doc.tags.terms(field) for field, term in required.items())]
    assert covering, f"no document tagged {required}"


def test_coverage_report_lists_every_rule_and_all_are_covered(documents):
    entries = coverage_report(documents)
    assert len(entries) == 44
    assert [e.interaction.name for e in entries if not e.covered] == []
    by_name = {e.interaction.name: e.document_ids for e in entries}
    # The warfarin rule is met by the three warfarin documents, and by nothing else.
    assert by_name["warfarin and vitamin K"] == ("kb-0001", "kb-0002", "kb-0003")
    assert by_name["digoxin and licorice"] == ("kb-0050", "kb-0051")


def test_coverage_report_marks_an_uncovered_rule():
    doc = _document("kb-0001", restricts=("vitamin k",), medications=("warfarin",))
    entries = {e.interaction.name: e for e in coverage_report([doc])}
    assert entries["warfarin and vitamin K"].document_ids == ("kb-0001",)
    assert entries["digoxin and licorice"].document_ids == ()
    assert not entries["digoxin and licorice"].covered


# ----------------------------------------------------------------------------- vocabulary lookups


def test_vocabulary_maps_synonyms_brands_and_plurals_to_canonical_terms():
    vocabulary = load_vocabulary()
    assert vocabulary.canonical("medication", "Coumadin") == "warfarin"
    assert vocabulary.canonical("medication", "  LISINOPRIL ") == "ace inhibitor"
    assert vocabulary.canonical("condition", "Kidney disease") == "ckd"
    assert vocabulary.canonical("condition", "coeliac") == "celiac disease"
    assert vocabulary.canonical("allergen", "peanuts") == "peanut"
    assert vocabulary.canonical("intake", "potassium chloride") == "salt substitute"
    assert vocabulary.canonical("medication", "vitamin k") is None
    assert vocabulary.find_terms("condition", "CKD stage 3 and high blood pressure") == ["ckd", "hypertension"]
    assert vocabulary.find_terms("condition", "chronic kidney disease") == ["ckd"]
    assert vocabulary.find_terms("medication", "I take Xarelto, Synthroid and Coumadin.") == ["doac", "levothyroxine", "warfarin"]
    assert vocabulary.find_terms("allergen", "allergic to walnuts and shrimp") == ["tree nut", "shellfish"]
    assert vocabulary.find_terms("medication", "nothing relevant here") == []


# ----------------------------------------------------------------------------- loader errors

SMALL_VOCABULARY = {
    "fields": {"encourages": "intake", "restricts": "intake", "conditions": "condition",
               "medications": "medication", "allergens": "allergen"},
    "kinds": {
        "intake": {"terms": {"vitamin k": [], "leafy green": ["greens"]}},
        "condition": {"terms": {"ckd": ["kidney disease"]}},
        "medication": {"terms": {"warfarin": ["coumadin"]}},
        "allergen": {"terms": {"peanut": []}},
    },
}


def _row(doc_id="kb-0001", **changes) -> dict:
    row = {
        "id": doc_id,
        "title": "Warfarin and vitamin K",
        "text": "Keep vitamin K intake steady while taking warfarin.",
        "source": "NIH ODS Vitamin K Fact Sheet",
        "category": "interaction",
        "tags": {"encourages": [], "restricts": ["vitamin k"], "conditions": [], "medications": ["warfarin"], "allergens": []},
        "questions": [{"question": "What should stay steady?", "answer": "Vitamin K intake."},
                      {"question": "Which drug?", "answer": "Warfarin."}],
    }
    row.update(changes)
    return row


def _write_kb(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.json").write_text(json.dumps(SMALL_VOCABULARY), encoding="utf-8")
    path = folder / "documents.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _without(row: dict, field: str) -> dict:
    return {k: v for k, v in row.items() if k != field}


def _tags(**tags) -> dict:
    base = {"encourages": [], "restricts": [], "conditions": [], "medications": [], "allergens": []}
    base.update(tags)
    return base


BROKEN_SECOND_LINES = [
    (json.dumps(_row("kb-0001")), "2: id: duplicate id 'kb-0001' (first seen on line 1)"),
    (json.dumps(_row("kb-0002", tags=_tags(restricts=["vitamin q"]))),
     "2: tags.restricts: unknown tag 'vitamin q' (not in vocabulary kind 'intake')"),
    (json.dumps(_row("kb-0002", tags=_tags(medications=["coumadin"]))),
     "2: tags.medications: 'coumadin' is a synonym; use the canonical term 'warfarin'"),
    (json.dumps(_row("kb-0002", tags=_tags(conditions=["warfarin"]))),
     "2: tags.conditions: unknown tag 'warfarin' (not in vocabulary kind 'condition')"),
    (json.dumps(_without(_row("kb-0002"), "title")), "2: title: missing field"),
    (json.dumps(_without(_row("kb-0002"), "questions")), "2: questions: missing field"),
    (json.dumps(_row("kb-0002", tags={k: v for k, v in _tags().items() if k != "encourages"})),
     "2: tags.encourages: missing field"),
    (json.dumps(_row("kb-0002", questions=[{"question": "Only one?", "answer": "Yes."}])),
     "2: questions: needs at least 2 questions, got 1"),
    (json.dumps(_row("kb-0002", questions=[{"question": "A?", "answer": ""}, {"question": "B?", "answer": "b"}])),
     "2: questions[0].answer: empty string"),
    (json.dumps(_row("kb-0002", category="recipe")),
     "2: category: unknown category 'recipe' (expected one of nutrient, food, diet_pattern, interaction, condition)"),
    (json.dumps(_row("kb-0002", summary="extra")), "2: unknown field 'summary'"),
    ('{"id": "kb-0002", "title": ', "2: invalid JSON: Expecting value (column 28)"),
    ("[1, 2]", "2: expected a JSON object, got array"),
]


@pytest.mark.parametrize("line, expected", BROKEN_SECOND_LINES, ids=[e for _, e in BROKEN_SECOND_LINES])
def test_broken_line_gives_exact_error_naming_file_line_and_field(tmp_path, line, expected):
    path = _write_kb(tmp_path / "kb", [json.dumps(_row("kb-0001")), line])
    with pytest.raises(KnowledgeBaseError) as caught:
        load_knowledge_base(tmp_path / "kb")
    assert str(caught.value) == f"{path}:{expected}"


def test_all_problems_are_reported_together_and_valid_kb_loads(tmp_path):
    good = _write_kb(tmp_path / "good", [json.dumps(_row("kb-0001")), "", json.dumps(_row("kb-0002"))])
    loaded = load_knowledge_base(good)  # a documents file: the vocabulary beside it is used
    assert [doc.id for doc in loaded] == ["kb-0001", "kb-0002"]
    assert loaded[0].tags == DocumentTags(restricts=("vitamin k",), medications=("warfarin",))
    assert loaded[0].questions[1] == QAPair("Which drug?", "Warfarin.")
    assert loaded[0].to_dict() == _row("kb-0001")

    bad = _write_kb(tmp_path / "bad", [
        json.dumps(_row("kb-0001", tags=_tags(allergens=["sesame"]))),
        json.dumps(_row("kb-0002", questions=[])),
    ])
    with pytest.raises(KnowledgeBaseError) as caught:
        load_knowledge_base(bad)
    assert caught.value.problems == [
        f"{bad}:1: tags.allergens: unknown tag 'sesame' (not in vocabulary kind 'allergen')",
        f"{bad}:2: questions: needs at least 2 questions, got 0",
    ]


def test_missing_files_and_bad_vocabulary_are_named(tmp_path):
    with pytest.raises(KnowledgeBaseError, match=re.escape(f"{tmp_path / 'none.jsonl'}: knowledge base file not found")):
        load_knowledge_base(tmp_path / "none.jsonl")
    vocabulary = dict(SMALL_VOCABULARY, kinds=dict(SMALL_VOCABULARY["kinds"],
                      medication={"terms": {"warfarin": ["coumadin"], "doac": ["coumadin"]}}))
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(vocabulary), encoding="utf-8")
    with pytest.raises(KnowledgeBaseError) as caught:
        load_vocabulary(path)
    assert str(caught.value) == f"{path}: kinds.medication.terms['doac']: synonym 'coumadin' already names 'warfarin'"


@pytest.mark.parametrize("text, expected", [
    (None, "{path}: file not found"),
    ('{"fields": ', "{path}:1: invalid JSON (Expecting value)"),
    ("[]", "{path}:1: expected a JSON object at the top level"),
    (json.dumps(dict(SMALL_VOCABULARY, kinds=dict(SMALL_VOCABULARY["kinds"], medication={"terms": {"warfarin": "coumadin"}}))),
     "{path}: kinds.medication.terms['warfarin']: expected a list of strings, got string"),
    (json.dumps(dict(SMALL_VOCABULARY, kinds=dict(SMALL_VOCABULARY["kinds"], medication={"terms": {"warfarin": [""]}}))),
     "{path}: kinds.medication.terms['warfarin'][0]: empty string"),
    (json.dumps(dict(SMALL_VOCABULARY, kinds=dict(SMALL_VOCABULARY["kinds"], medication=[]))),
     "{path}: kinds.medication: expected a JSON object, got array"),
])
def test_vocabulary_problems_are_worded_like_every_other_json_input(tmp_path, text, expected):
    path = tmp_path / "vocabulary.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(KnowledgeBaseError) as caught:
        load_vocabulary(path)
    assert str(caught.value) == expected.format(path=path)


def test_document_field_types_are_worded_like_the_stage_files(tmp_path):
    row = _row("kb-0002", title=7, tags=_tags(restricts="vitamin k"), questions=[["A?", "a"], {"question": "B?", "answer": "b"}])
    path = _write_kb(tmp_path / "kb", [json.dumps(_row("kb-0001")), json.dumps(row)])
    with pytest.raises(KnowledgeBaseError) as caught:
        load_knowledge_base(tmp_path / "kb")
    assert caught.value.problems == [
        f"{path}:2: title: expected a string, got number",
        f"{path}:2: tags.restricts: expected a list of strings, got string",
        f"{path}:2: questions[0]: expected a JSON object, got array",
    ]


# ----------------------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def converted(tmp_path_factory, documents):
    out = tmp_path_factory.mktemp("stages")
    counts = convert(documents, out, ConversionConfig())
    rows = {name: [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()] for name in STAGE_FILES}
    return out, counts, rows


def test_converter_writes_the_six_stage_files_atomically(converted, documents):
    out, counts, rows = converted
    assert sorted(p.name for p in out.iterdir()) == sorted([*STAGE_FILES, "summary.json"])  # no temporary files left
    total = sum(len(doc.questions) for doc in documents)
    assert counts["stage2_dev"] == round(0.2 * total)
    assert counts["stage2_train"] + counts["stage2_dev"] == total
    assert counts["stage1_2_train"] == counts["stage2_train"]
    assert {name: len(r) for name, r in rows.items()} == {f"{stem}.jsonl": n for stem, n in counts.items()}


def test_stage1_rows_hold_one_document_and_its_questions(converted, documents):
    _, _, rows = converted
    by_text = {doc.text: doc for doc in documents}
    seen = Counter()
    for name in ("stage1_train.jsonl", "stage1_dev.jsonl"):
        for row in rows[name]:
            assert set(row) == {"data_type", "question", "answers", "docs"}
            assert row["data_type"] == "qa" and len(row["docs"]) == 1
            doc = by_text[row["docs"][0]]
            pairs = {(qa.question, qa.answer) for qa in doc.questions}
            assert len(row["question"]) == len(row["answers"]) >= 1
            assert set(zip(row["question"], row["answers"])) <= pairs
            seen.update(row["question"])
    assert sum(seen.values()) == sum(len(doc.questions) for doc in documents)


def test_stage2_pos_index_points_at_the_questions_own_document(converted, documents):
    _, _, rows = converted
    owner = {(qa.question, qa.answer): doc.text for doc in documents for qa in doc.questions}
    positions = Counter()
    for name in ("stage2_train.jsonl", "stage2_dev.jsonl"):
        for row in rows[name]:
            assert set(row) == {"question", "docs", "answer", "golden_answers", "pos_index"}
            assert len(row["docs"]) == 20 and len(set(row["docs"])) == 20
            [index] = row["pos_index"]
            assert row["docs"][index] == owner[(row["question"], row["answer"])]
            assert sum(text == owner[(row["question"], row["answer"])] for text in row["docs"]) == 1
            positions[index] += 1
    assert len(positions) > 10  # the positive is not always in the same slot


def test_stage1_2_rows_hold_own_document_among_top_k(converted, documents):
    _, _, rows = converted
    owner = {(qa.question, qa.answer): doc.text for doc in documents for qa in doc.questions}
    for name in ("stage1_2_train.jsonl", "stage1_2_dev.jsonl"):
        for row in rows[name]:
            assert set(row) == {"question", "docs", "answer", "golden_answers"}
            assert len(row["docs"]) == 5 and len(set(row["docs"])) == 5
            assert owner[(row["question"], row["answer"])] in row["docs"]


def test_split_is_by_question_and_deterministic(documents):
    config = ConversionConfig(dev_fraction=0.2, seed=0)
    dev = split_questions(documents, config)
    assert dev == split_questions(documents, ConversionConfig(dev_fraction=0.2, seed=0))
    assert dev != split_questions(documents, ConversionConfig(dev_fraction=0.2, seed=1))
    all_keys = {(doc.id, i) for doc in documents for i in range(len(doc.questions))}
    assert dev < all_keys and len(dev) == round(0.2 * len(all_keys))
    rows = build_stage_rows(documents, config)
    dev_questions = {row["question"] for row in rows["stage2_dev"]}
    train_questions = {row["question"] for row in rows["stage2_train"]}
    assert dev_questions.isdisjoint(train_questions)


def test_hard_negatives_are_the_best_overlapping_documents(documents):
    word_sets = {doc.id: content_words(doc.title + " " + doc.text) for doc in documents}
    doc = documents[0]
    qa = doc.questions[0]
    ranked = rank_negatives(qa, doc, documents, word_sets)
    assert doc not in ranked and len(ranked) == len(documents) - 1
    question_words, answer_words = content_words(qa.question), content_words(qa.answer)
    keys = [(answer_words <= word_sets[d.id], -len(question_words & word_sets[d.id]), d.id) for d in ranked]
    assert keys == sorted(keys)
    # Documents that contain the whole answer come last: they might answer the question too.
    assert not keys[0][0]


def test_conversion_is_byte_identical_when_repeated(tmp_path, documents):
    config = ConversionConfig(n_candidates=4, top_k=2)
    convert(documents, tmp_path / "a", config)
    convert(documents, tmp_path / "b", config)
    for name in STAGE_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _document(doc_id: str, n_questions: int = 3, **tags) -> KBDocument:
    return KBDocument(
        id=doc_id, title=f"title {doc_id}", text=f"text of {doc_id} about topic {doc_id}", source="s",
        category="food", tags=DocumentTags(**{k: tuple(v) for k, v in tags.items()}),
        questions=tuple(QAPair(f"question {i} on {doc_id}?", f"answer {i}") for i in range(n_questions)),
    )


@settings(max_examples=40, deadline=None)
@given(
    n_docs=st.integers(min_value=3, max_value=12),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=10_000),
    n_candidates=st.integers(min_value=1, max_value=3),
)
def test_rows_are_consistent_for_any_small_kb(n_docs, fraction, seed, n_candidates):
    docs = [_document(f"d{i}", n_questions=2 + i % 2) for i in range(n_docs)]
    config = ConversionConfig(dev_fraction=fraction, seed=seed, n_candidates=n_candidates, top_k=1)
    rows = build_stage_rows(docs, config)
    total = sum(len(d.questions) for d in docs)
    assert len(rows["stage2_dev"]) == round(fraction * total)
    assert len(rows["stage2_train"]) + len(rows["stage2_dev"]) == total
    texts = {(qa.question): d.text for d in docs for qa in d.questions}
    for row in rows["stage2_train"] + rows["stage2_dev"]:
        assert len(row["docs"]) == n_candidates
        assert row["docs"][row["pos_index"][0]] == texts[row["question"]]
    for row in rows["stage1_2_train"] + rows["stage1_2_dev"]:
        assert row["docs"] == [texts[row["question"]]]


def test_too_many_candidates_and_bad_fractions_are_rejected(documents):
    with pytest.raises(ValueError, match=f"n_candidates=500 is more than the {len(documents)} documents"):
        build_stage_rows(documents, ConversionConfig(n_candidates=500))
    with pytest.raises(ValueError, match="dev_fraction must be between 0 and 1, got 1.5"):
        ConversionConfig(dev_fraction=1.5)


# ----------------------------------------------------------------------------- command line


def test_cli_converts_reports_coverage_and_explains_flags(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--n_candidates", "3", "--top_k", "2", "--dev_fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "543 questions" in printed and "stage2_dev.jsonl: 272 rows" in printed
    row = json.loads((tmp_path / "out" / "stage2_dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert len(row["docs"]) == 3

    assert main(["--coverage"]) == 0
    assert "44/44 required interactions covered" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--kb", "--out", "--dev_fraction", "--seed", "--n_candidates", "--top_k", "--coverage"):
        assert flag in help_text

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "--out is required unless --coverage is given" in capsys.readouterr().err


def test_cli_reports_an_invalid_kb_with_exit_code_2(tmp_path, capsys):
    path = _write_kb(tmp_path / "kb", [json.dumps(_row("kb-0001", questions=[]))])
    assert main(["--kb", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"{path}:1: questions: needs at least 2 questions, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

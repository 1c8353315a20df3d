"""NutriBot's document and answer filters: restricted items named by everyday words, one warning per
contraindication and item, the order of documents, over the whole knowledge base x every rule."""

from __future__ import annotations

import pytest

from clara.data.knowledge_base import load_knowledge_base
from nutribot.filters import answer_warnings, filter_documents, restricted_mentions, warning_text
from nutribot.safety import extract_contraindications
from nutribot.safety_rules import RULES

# One context per rule of the table, so every rule's restrictions meet every document.
CONTEXT_OF_RULE = {
    "warfarin": "on warfarin", "maoi": "takes phenelzine", "statin": "on simvastatin", "ccb": "on felodipine",
    "grapefruit_drug": "on tacrolimus", "levothyroxine": "takes levothyroxine", "lithium": "on lithium",
    "metformin": "on metformin", "potassium_raising": "on lisinopril", "potassium_wasting": "on furosemide",
    "ckd": "CKD stage 4", "hypertension": "hypertension", "heart_failure": "heart failure", "pregnancy": "pregnant",
    "breastfeeding": "breastfeeding", "celiac": "celiac disease", "gluten_sensitivity": "gluten intolerance",
    "pku": "PKU", "gout": "gout", "lactose": "lactose intolerant", "diabetes": "type 2 diabetes",
    "kidney_stones": "kidney stones", "hemochromatosis": "hemochromatosis", "peanut_allergy": "peanut allergy",
    "tree_nut_allergy": "tree nut allergy", "shellfish_allergy": "shellfish allergy", "fish_allergy": "fish allergy",
    "egg_allergy": "egg allergy", "milk_allergy": "milk allergy", "soy_allergy": "soy allergy",
    "wheat_allergy": "wheat allergy", "sesame_allergy": "sesame allergy",
}


def kb_documents() -> list[dict]:
    return [{"id": d.id, "title": d.title, "text": d.text,
             "tags": {f: list(d.tags.terms(f)) for f in ("encourages", "restricts", "conditions", "medications",
                                                          "allergens")}}
            for d in load_knowledge_base()]


def test_every_rule_has_a_context():
    assert set(CONTEXT_OF_RULE) == {r.key for r in RULES}
    for key, context in CONTEXT_OF_RULE.items():
        rule = next(r for r in RULES if r.key == key)
        assert [c.name.split(" (")[0] for c in extract_contraindications(context)] == [rule.name], context


def test_everyday_words_and_plurals_name_the_restricted_item():
    warfarin, ckd = extract_contraindications("on Coumadin; CKD stage 4")
    text = "A kale salad with bananas, and salt. Kale again. Kalamata olives."
    assert [(c.name, w) for c, w in restricted_mentions(text, [warfarin, ckd])] == [
        ("warfarin", "kale"), ("chronic kidney disease (stage 4)", "bananas"),
        ("chronic kidney disease (stage 4)", "salt")]
    assert warning_text(warfarin, "kale") == "warfarin: mentions kale (vitamin k)"
    assert warning_text(warfarin, "vitamin k") == "warfarin: mentions vitamin k"
    assert restricted_mentions("Kalamata olives and eggplant", extract_contraindications("egg allergy; on warfarin")) \
        == []


@pytest.mark.parametrize("key", sorted(CONTEXT_OF_RULE))
def test_whole_knowledge_base_every_mention_warned_and_encouraging_documents_last(key):
    contraindications = extract_contraindications(CONTEXT_OF_RULE[key])
    documents = kb_documents()
    kept = filter_documents(documents, contraindications)
    assert sorted(f.document["id"] for f in kept) == sorted(d["id"] for d in documents)  # nothing dropped
    for f in kept:
        text = f"{f.document['title']}\n{f.document['text']}"
        for c, word in restricted_mentions(text, contraindications):
            assert any(c.name in w and word in w for w in f.warnings), (f.document["id"], word)
        if not restricted_mentions(text, contraindications):
            assert f.warnings == [] and not f.encourages_restricted and not f.about_restriction
    flags = [f.encourages_restricted for f in kept]
    assert flags == sorted(flags)  # every encouraging document after every other
    about = [f.about_restriction for f in kept if not f.encourages_restricted]
    assert about == sorted(about, reverse=True)  # about-the-restriction first


def test_warfarin_documents_about_vitamin_k_come_first_and_encouraging_ones_last():
    documents = kb_documents()
    kept = filter_documents(documents, extract_contraindications("on warfarin"))
    first = kept[0]
    assert first.about_restriction and first.document["id"] == "kb-0001"  # "Warfarin and vitamin K: keep intake steady"
    encouraging = [f for f in kept if f.encourages_restricted]
    assert encouraging and all(f.warnings for f in encouraging)
    assert kept[-len(encouraging):] == encouraging


def test_untagged_passages_use_text_cues():
    contraindications = extract_contraindications("on warfarin")
    pdf_passages = [{"text": "Eat more kale and spinach every day."},
                    {"text": "Keep your vitamin K intake steady while on warfarin."},
                    {"text": "Oats are a whole grain."}]
    kept = filter_documents(pdf_passages, contraindications)
    assert [f.document["text"][:4] for f in kept] == ["Keep", "Oats", "Eat "]
    assert kept[2].encourages_restricted and kept[0].about_restriction and kept[1].warnings == []


def test_answer_warnings_cover_every_restricted_item_named():
    contraindications = extract_contraindications("Pregnant. On Coumadin. Peanut allergy.")
    answer = ("Choose salmon twice a week, but skip swordfish. A spinach salad is fine. "
              "Avoid unpasteurised brie; peanut butter toast is a bad idea. Have no wine.")
    warnings = answer_warnings(answer, contraindications)
    assert warnings == ["pregnancy: mentions swordfish (high-mercury fish)",
                        "pregnancy: mentions unpasteurised, brie (listeria)",
                        "pregnancy: mentions wine (alcohol)",
                        "warfarin: mentions spinach (vitamin k)",
                        "peanut allergy: mentions peanut butter (peanut)"]
    assert answer_warnings("Drink water.", contraindications) == []

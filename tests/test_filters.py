"""NutriBot's document and answer filters: restricted items named by everyday words, one warning per
contraindication and item, the order of documents, over the whole knowledge base x every rule."""

from __future__ import annotations

import pytest
from clara.data.knowledge_base import load_knowledge_base

from nutribot.filters import answer_warnings, filter_documents, restricted_mentions, warning_text
from nutribot.safety import Contraindication, extract_contraindications
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
    "wheat_allergy": "wheat allergy", "sesame_allergy": "sesame allergy", "gerd": "GERD",
    "ibd": "Crohn's disease",
}


def kb_documents() -> list[dict]:
    return [{"id": d.id, "title": d.title, "text": d.text,
             "tags": {f: list(d.tags.terms(f)) for f in ("encourages", "restricts", "conditions", "medications",
                                                          "allergens")}}
            for d in load_knowledge_base()]


def tagged_as(tag: str, item: str) -> bool:
    """The KB tag names the item, itself or as one of its foods ("spinach" for vitamin k); a tag that
    only contains the word ("low-mercury fish", "lactose-free dairy") is another food."""
    return any(word == tag for _, word in restricted_mentions(tag, [Contraindication("x", "x", (item,), "x.")]))


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
        for c in contraindications:
            encouraged = [i for i in c.restricts if any(tagged_as(t, i) for t in f.document["tags"]["encourages"])]
            assert f.encourages_restricted >= bool(encouraged), (f.document["id"], encouraged)
            for item in encouraged:
                assert any(c.name in w and item in w for w in f.warnings), (f.document["id"], item)
        tagged = any(tagged_as(t, i) for c in contraindications for i in c.restricts
                     for t in f.document["tags"]["encourages"] + f.document["tags"]["restricts"])
        if not restricted_mentions(text, contraindications) and not tagged:
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


def test_about_the_restriction_means_this_patients_condition_and_item():
    salt_for_blood_pressure = {"text": "Cut back on salty snacks.", "title": "Salt",
                               "tags": {"encourages": [], "restricts": ["sodium"], "conditions": ["hypertension"],
                                        "medications": [], "allergens": []}}
    ckd_by_text = {"text": "With chronic kidney disease, limit bananas and potatoes."}
    plain = {"text": "Lunch ideas: baked potatoes."}
    ckd = extract_contraindications("CKD stage 3")
    kept = filter_documents([plain, salt_for_blood_pressure, ckd_by_text], ckd)
    assert [f.document for f in kept] == [ckd_by_text, plain, salt_for_blood_pressure]
    assert [f.about_restriction for f in kept] == [True, False, False]
    by_doc = {id(f.document): f for f in kept}
    assert not by_doc[id(salt_for_blood_pressure)].about_restriction  # sodium, but tagged for another condition
    assert by_doc[id(salt_for_blood_pressure)].warnings == [
        "chronic kidney disease (stage 3): mentions salt, salty (sodium)"]
    assert by_doc[id(plain)].warnings == ["chronic kidney disease (stage 3): mentions potatoes (potassium)"]
    hypertension = extract_contraindications("HTN")
    assert filter_documents([plain, salt_for_blood_pressure], hypertension)[0].about_restriction


def test_a_tag_alone_earns_a_warning_and_demote_false_keeps_the_given_order():
    warfarin = extract_contraindications("on Jantoven")
    greens = {"text": "Recipes for the week.", "tags": {"encourages": ["leafy green", "vitamin k"], "restricts": []}}
    oats = {"text": "Oats for breakfast.", "tags": {"encourages": ["oat"], "restricts": []}}
    demoted = filter_documents([greens, oats], warfarin)
    assert [f.document for f in demoted] == [oats, greens]
    assert demoted[1].encourages_restricted and demoted[1].warnings == ["warfarin: mentions vitamin k"]
    kept = filter_documents([greens, oats], warfarin, demote=False)
    assert [f.document for f in kept] == [greens, oats] and kept[0].encourages_restricted
    assert filter_documents([], warfarin) == [] and filter_documents([oats], [])[0].warnings == []


def test_answer_warnings_over_several_sentences_and_contraindications():
    contraindications = extract_contraindications("ESRD on dialysis. Takes Nardil and Synthroid. Gout.")
    answer = ("Bananas and orange juice are rich in potassium. Aged cheese and soy sauce go well together!\n"
              "Take calcium supplements with breakfast? Organ meats are nutritious; so is a cold lager.")
    assert answer_warnings(answer, contraindications) == [
        "chronic kidney disease: mentions bananas, orange juice, potassium (potassium)",
        "chronic kidney disease: mentions soy sauce (sodium)",
        "MAO inhibitor: mentions aged cheese, soy sauce (tyramine)",
        "levothyroxine: mentions soy",
        "levothyroxine: mentions calcium supplements (calcium)",
        "gout: mentions organ meats (purine)",
        "gout: mentions lager (beer)",
    ]
    for c, word in restricted_mentions(answer, contraindications):
        assert any(c.name in w and word in w for w in answer_warnings(answer, contraindications))


def test_a_word_naming_two_items_of_one_contraindication_is_listed_once():
    (c,) = extract_contraindications("on spironolactone")
    warnings = answer_warnings("Use a salt substitute sparingly; potassium matters.", [c])
    assert len(warnings) == 1 and warnings[0].count("salt substitute") == 1

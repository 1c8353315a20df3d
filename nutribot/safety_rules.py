"""The rule table of NutriBot's safety layer: what in a patient's context restricts which foods, and why.

Each rule names a contraindication, the phrases that mention it (regular expressions, matched as
whole words, case-insensitive), the intake items it restricts (canonical terms of the knowledge
base's vocabulary, so the KB's tags match them) and one sentence of reason. FOODS lists, per
restricted item, the everyday words a document or an answer may use for it: a warning is due
when "kale" is named, not only "vitamin K".

This is general guidance for retrieval and labelling, written from public sources (NIH ODS fact
sheets, FDA/EPA fish advice, KDIGO/NKF, national guidelines). It is not a clinical decision aid.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    key: str  # one contraindication per key, however often it is mentioned
    name: str
    patterns: tuple[str, ...]
    restricts: tuple[str, ...]
    reason: str
    allergy: bool = False  # mentions count only beside an allergy cue ("allergic to", "X allergy")
    # The knowledge base's condition / medication / allergen terms for this contraindication: a
    # document tagged with one of them and restricting the item is about this very restriction.
    kb_terms: tuple[str, ...] = ()


def _rule(key, name, patterns, restricts, reason, allergy=False, kb=()) -> Rule:
    return Rule(key, name, tuple(patterns), tuple(restricts), reason, allergy, tuple(kb))


PREGNANCY_ITEMS = ("high-mercury fish", "listeria", "alcohol", "raw foods")

RULES: tuple[Rule, ...] = (
    # -- medications -------------------------------------------------------------------------
    _rule("warfarin", "warfarin", [r"warfarin", r"coumadin", r"jantoven", r"marevan"], ["vitamin k"],
          "Warfarin's effect changes with vitamin K intake: keep vitamin K steady from week to week rather "
          "than cutting it out, and tell the anticoagulation clinic before big diet changes.",
          kb=("warfarin",)),
    _rule("maoi", "MAO inhibitor", [r"maois?", r"mao inhibitors?", r"monoamine oxidase inhibitors?", r"phenelzine",
                                    r"nardil", r"tranylcypromine", r"parnate", r"isocarboxazid", r"marplan",
                                    r"selegiline", r"emsam", r"rasagiline", r"azilect", r"linezolid"],
          ["tyramine"],
          "MAO inhibitors with tyramine-rich foods (aged cheese, cured meats, tap beer, soy sauce) can cause "
          "a dangerous rise in blood pressure.",
          kb=("maoi",)),
    _rule("statin", "statin", [r"statins?", r"atorvastatin", r"lipitor", r"simvastatin", r"zocor", r"lovastatin",
                               r"mevacor", r"altoprev"],
          ["grapefruit"],
          "Grapefruit raises the blood level of some statins (simvastatin, lovastatin, atorvastatin) and the "
          "risk of muscle damage.",
          kb=("statin",)),
    _rule("ccb", "calcium channel blocker", [r"calcium[- ]channel blockers?", r"ccbs?", r"felodipine", r"plendil",
                                             r"nifedipine", r"procardia", r"adalat", r"amlodipine", r"norvasc",
                                             r"nisoldipine", r"verapamil", r"diltiazem"],
          ["grapefruit"], "Grapefruit raises the blood level of several calcium channel blockers.",
          kb=("calcium channel blocker",)),
    _rule("grapefruit_drug", "grapefruit-sensitive medicine",
          [r"cyclosporine", r"ciclosporin", r"neoral", r"sandimmune", r"tacrolimus", r"prograf", r"buspirone",
           r"buspar", r"amiodarone", r"cordarone", r"pacerone"],
          ["grapefruit"], "Grapefruit changes the blood level of this medicine; ask the pharmacist.",
          kb=("cyclosporine", "tacrolimus", "amiodarone")),
    _rule("levothyroxine", "levothyroxine", [r"levothyroxine", r"synthroid", r"levoxyl", r"euthyrox", r"unithroid",
                                             r"tirosint", r"eltroxin", r"thyroid hormone replacement", r"l-?t4"],
          ["soy", "calcium", "iron"],
          "Soy, calcium and iron reduce levothyroxine absorption: take it on an empty stomach and about four "
          "hours apart from calcium or iron supplements.",
          kb=("levothyroxine", "hypothyroidism")),
    _rule("lithium", "lithium", [r"lithium", r"lithobid", r"priadel"], ["sodium", "caffeine"],
          "Changes in salt, fluid or caffeine intake change lithium levels: keep them steady.",
          kb=("lithium",)),
    _rule("metformin", "metformin", [r"metformin", r"glucophage", r"glumetza", r"fortamet"], ["alcohol"],
          "Alcohol with metformin raises the risk of lactic acidosis and low blood sugar.",
          kb=("metformin",)),
    _rule("potassium_raising", "potassium-raising medicine",
          [r"ace[- ]inhibitors?", r"acei", r"lisinopril", r"zestril", r"prinivil", r"enalapril", r"vasotec",
           r"ramipril", r"altace", r"captopril", r"benazepril", r"lotensin", r"quinapril", r"perindopril",
           r"arbs?", r"angiotensin receptor blockers?", r"losartan", r"cozaar", r"valsartan", r"diovan",
           r"irbesartan", r"candesartan", r"olmesartan", r"telmisartan", r"entresto",
           r"potassium[- ]sparing diuretics?", r"k[- ]sparing diuretics?", r"spironolactone", r"aldactone",
           r"eplerenone", r"inspra", r"amiloride", r"triamterene", r"dyrenium"],
          ["potassium", "salt substitute"],
          "This medicine raises blood potassium: ask before using salt substitutes (potassium chloride) or "
          "potassium supplements, and ask about high-potassium foods.",
          kb=("ace inhibitor", "arb", "potassium-sparing diuretic", "spironolactone")),
    _rule("potassium_wasting", "potassium-wasting diuretic",
          [r"loop diuretics?", r"thiazides?", r"thiazide diuretics?", r"furosemide", r"lasix", r"bumetanide",
           r"bumex", r"torsemide", r"hydrochlorothiazide", r"hctz", r"chlorthalidone", r"indapamide"],
          ["licorice"], "Licorice (glycyrrhizin) lowers potassium further on these diuretics.",
          kb=("loop diuretic", "thiazide diuretic")),
    # -- conditions ----------------------------------------------------------------------------
    _rule("ckd", "chronic kidney disease",
          [r"ckd", r"chronic kidney disease", r"chronic renal (?:failure|insufficiency|disease)",
           r"kidney failure", r"renal failure", r"esrd", r"end[- ]stage renal disease", r"end[- ]stage kidney disease",
           r"(?:hemo|haemo|peritoneal )?dialysis"],
          ["potassium", "phosphorus", "sodium", "protein"],
          "With kidney disease, potassium, phosphorus, sodium and protein often need limits set by the renal team.",
          kb=("ckd", "dialysis")),
    _rule("hypertension", "hypertension", [r"hypertension", r"htn", r"high blood pressure", r"hypertensive"],
          ["sodium", "licorice"], "Salt raises blood pressure, and black licorice can raise it further.",
          kb=("hypertension",)),
    _rule("heart_failure", "heart failure",
          [r"heart failure", r"chf", r"hfref", r"hfpef", r"congestive cardiac failure", r"cardiac failure"],
          ["sodium"], "With heart failure, salt makes the body hold fluid; the care team usually sets a sodium limit.",
          kb=("heart failure",)),
    _rule("pregnancy", "pregnancy",
          [r"pregnant", r"pregnancy", r"\d{1,2} weeks? (?:pregnant|gestation)", r"expecting a baby",
           r"(?:first|second|third) trimester"],
          PREGNANCY_ITEMS,
          "In pregnancy avoid high-mercury fish, listeria-risk foods (unpasteurized dairy, deli meats, smoked "
          "seafood), alcohol and raw or undercooked foods.",
          kb=("pregnancy",)),
    _rule("breastfeeding", "breastfeeding", [r"breast[- ]?feeding", r"nursing (?:mother|her baby|an infant)",
                                             r"lactating"],
          ["alcohol", "high-mercury fish"], "While breastfeeding, alcohol and high-mercury fish reach the baby.",
          kb=("breastfeeding",)),
    _rule("celiac", "celiac disease", [r"celiac(?: disease| sprue)?", r"coeliac(?: disease)?",
                                       r"gluten[- ]sensitive enteropathy"],
          ["gluten"], "With celiac disease any gluten (wheat, barley, rye) damages the gut: avoid it completely.",
          kb=("celiac disease",)),
    _rule("gluten_sensitivity", "gluten sensitivity", [r"gluten (?:intolerance|sensitivity)", r"gluten[- ]intolerant"],
          ["gluten"], "Gluten causes this patient's symptoms.",
          kb=("celiac disease",)),
    _rule("pku", "phenylketonuria", [r"pku", r"phenylketonuria"], ["phenylalanine", "aspartame"],
          "With PKU, phenylalanine (in protein foods and the sweetener aspartame) must stay within the "
          "metabolic team's limit.",
          kb=("pku",)),
    _rule("gout", "gout", [r"gout", r"gouty arthritis", r"hyperuricemia", r"hyperuricaemia"],
          ["purine", "beer"],
          "Purine-rich foods (organ meats, some seafood) and beer raise uric acid and trigger gout.",
          kb=("gout",)),
    _rule("lactose", "lactose intolerance", [r"lactose intoleran(?:ce|t)", r"lactose malabsorption",
                                             r"lactase deficiency"],
          ["lactose"], "Lactose causes this patient's symptoms; lactose-free or low-lactose choices help.",
          kb=("lactose intolerance",)),
    _rule("diabetes", "diabetes",
          [r"diabetes(?: mellitus)?", r"diabetic", r"t1dm?", r"t2dm?", r"dm1", r"dm2", r"dm ?type ?[12]",
           r"type (?:1|2|one|two|i|ii) diabetes", r"iddm", r"niddm"],
          ["added sugar"], "With diabetes, added sugars and sugary drinks raise blood glucose quickly.",
          kb=("diabetes",)),
    _rule("kidney_stones", "kidney stones",
          [r"kidney stones?", r"renal (?:calculi|stones?)", r"nephrolithiasis", r"urolithiasis",
           r"calcium oxalate stones?"],
          ["oxalate"], "Calcium oxalate stones: limit high-oxalate foods such as spinach, rhubarb and nuts.",
          kb=("kidney stone",)),
    _rule("hemochromatosis", "hemochromatosis",
          [r"ha?emochromatosis", r"iron overload"], ["iron", "vitamin c supplement", "raw shellfish"],
          "With hemochromatosis avoid iron supplements and iron-fortified foods, vitamin C supplements (more "
          "iron absorbed) and raw shellfish (Vibrio infection).",
          kb=("hemochromatosis",)),
    _rule("gerd", "GERD", [r"gerd", r"gord", r"gastro-?o?esophageal reflux(?: disease)?", r"acid reflux",
                           r"reflux disease"],
          ["alcohol", "caffeine", "fried food"],
          "With reflux, alcohol, caffeine and fatty or fried meals often bring on heartburn.",
          kb=("gerd",)),
    _rule("ibd", "inflammatory bowel disease",
          [r"ibd", r"inflammatory bowel disease", r"crohn(?:[’']?s)?(?: disease)?", r"ulcerative colitis"],
          ["fiber", "alcohol"],
          "With IBD, high-fibre foods can worsen a flare or block a narrowed bowel, and alcohol can "
          "aggravate symptoms; the IBD team sets how much fibre."),
    # -- allergies -------------------------------------------------------------------------------
    _rule("peanut_allergy", "peanut allergy", [r"peanuts?", r"groundnuts?", r"arachis"], ["peanut"],
          "Peanut allergy: avoid peanuts and foods made with them.", allergy=True,
          kb=("peanut", "food allergy")),
    _rule("tree_nut_allergy", "tree nut allergy",
          [r"tree[- ]nuts?", r"nuts?", r"almonds?", r"walnuts?", r"cashews?", r"pecans?", r"pistachios?",
           r"hazelnuts?", r"macadamias?", r"brazil nuts?", r"pine nuts?"], ["tree nut"],
          "Tree nut allergy: avoid tree nuts and foods made with them.", allergy=True,
          kb=("tree nut", "food allergy")),
    _rule("shellfish_allergy", "shellfish allergy",
          [r"shellfish", r"shrimps?", r"prawns?", r"crabs?", r"lobsters?", r"crayfish", r"crustaceans?",
           r"mollus[ck]s?"], ["shellfish"], "Shellfish allergy: avoid shellfish.", allergy=True,
          kb=("shellfish", "food allergy")),
    _rule("fish_allergy", "fish allergy", [r"fish", r"finfish"], ["fish"], "Fish allergy: avoid fish.", allergy=True,
          kb=("fish", "food allergy")),
    _rule("egg_allergy", "egg allergy", [r"eggs?", r"egg whites?"], ["egg"], "Egg allergy: avoid eggs.",
          allergy=True,
          kb=("egg", "food allergy")),
    _rule("milk_allergy", "milk allergy", [r"milk", r"cow'?s milk(?: protein)?", r"dairy", r"casein", r"whey"],
          ["dairy"], "Milk allergy: avoid milk and dairy products.", allergy=True,
          kb=("milk", "food allergy")),
    _rule("soy_allergy", "soy allergy", [r"soy", r"soya", r"soybeans?"], ["soy"], "Soy allergy: avoid soy.",
          allergy=True,
          kb=("soy", "food allergy")),
    _rule("wheat_allergy", "wheat allergy", [r"wheat"], ["wheat"], "Wheat allergy: avoid wheat.", allergy=True,
          kb=("wheat", "food allergy")),
    _rule("sesame_allergy", "sesame allergy", [r"sesame(?: seeds?)?", r"tahini"], ["sesame"],
          "Sesame allergy: avoid sesame and tahini.", allergy=True,
          kb=("sesame", "food allergy")),
)

RULES_BY_KEY = {r.key: r for r in RULES}

# Words that name a restricted item in a document or an answer, beyond the item and its vocabulary
# synonyms. Plurals are matched by the filters (an optional "s" / "es").
FOODS: dict[str, tuple[str, ...]] = {
    "vitamin k": ("kale", "spinach", "collard greens", "collards", "turnip greens", "swiss chard", "chard",
                  "mustard greens", "broccoli", "brussels sprouts", "parsley", "leafy greens", "leafy green",
                  "green leafy vegetables", "natto", "vitamin k supplement"),
    "tyramine": ("aged cheese", "cheddar", "parmesan", "blue cheese", "cured meat", "salami", "pepperoni",
                 "tap beer", "draft beer", "soy sauce", "sauerkraut", "kimchi", "miso", "fermented soy",
                 "yeast extract", "marmite", "fava beans", "broad beans"),
    "grapefruit": ("grapefruit juice", "pomelo", "seville orange"),
    "soy": ("soya", "soybean", "tofu", "soy milk", "edamame", "tempeh"),
    "calcium": ("calcium supplement", "calcium carbonate", "calcium-fortified", "antacid"),
    "iron": ("iron supplement", "ferrous sulfate", "iron-fortified", "fortified cereal", "red meat", "liver"),
    "sodium": ("salt", "salty", "table salt", "sea salt", "processed meat", "deli meat", "canned soup",
               "soy sauce", "pickles", "chips"),
    "caffeine": ("coffee", "espresso", "energy drink", "cola", "black tea"),
    "alcohol": ("wine", "beer", "spirits", "liquor", "alcoholic drinks", "cocktail", "vodka", "whisky", "whiskey"),
    "potassium": ("banana", "bananas", "potato", "potatoes", "sweet potato", "orange juice", "oranges",
                  "tomato", "tomatoes", "avocado", "dried fruit", "beans", "lentils", "potassium supplement",
                  "salt substitute", "coconut water"),
    "salt substitute": ("potassium chloride", "lo salt", "nosalt", "nu-salt"),
    "phosphorus": ("phosphate", "phosphate additive", "cola", "processed cheese", "dairy"),
    "protein": ("high-protein", "protein shake", "protein powder"),
    "licorice": ("liquorice", "glycyrrhizin"),
    "high-mercury fish": ("mercury", "shark", "swordfish", "king mackerel", "tilefish", "bigeye tuna", "marlin",
                          "orange roughy"),
    "listeria": ("unpasteurized", "unpasteurised", "raw milk", "soft cheese", "brie", "camembert", "queso fresco",
                 "feta", "deli meat", "hot dog", "pâté", "pate", "smoked salmon", "smoked seafood", "lox"),
    "raw foods": ("raw fish", "sushi", "sashimi", "raw egg", "runny egg", "undercooked meat", "rare meat",
                  "raw oysters", "raw shellfish", "raw sprouts", "steak tartare", "ceviche"),
    "gluten": ("wheat", "barley", "rye", "bread", "pasta", "couscous", "semolina", "spelt", "malt", "seitan",
               "bulgur", "farro"),
    "phenylalanine": ("aspartame", "diet soda"),
    "aspartame": ("diet soda", "nutrasweet", "equal sweetener"),
    "purine": ("purines", "organ meat", "liver", "kidneys", "sweetbreads", "anchovies", "sardines", "herring",
               "mussels", "scallops", "trout", "haddock"),
    "beer": ("lager", "ale"),
    "lactose": ("milk", "ice cream", "cream", "soft cheese", "cottage cheese", "whey"),
    "added sugar": ("added sugars", "sugar-sweetened", "sugary drinks", "soda", "soft drinks", "candy", "sweets",
                    "desserts", "pastries", "syrup", "honey", "table sugar", "fruit juice"),
    "oxalate": ("spinach", "rhubarb", "beets", "beet greens", "swiss chard", "almonds", "cashews", "nuts",
                "peanuts", "sweet potatoes", "okra", "bran"),
    "vitamin c supplement": ("vitamin c supplements", "ascorbic acid supplement"),
    "raw shellfish": ("raw oysters", "oysters", "raw clams"),
    "peanut": ("peanuts", "peanut butter", "groundnut", "satay", "arachis oil"),
    "tree nut": ("almond", "walnut", "cashew", "pecan", "pistachio", "hazelnut", "macadamia", "brazil nut",
                 "pine nut", "nuts", "nut butter", "marzipan"),
    "shellfish": ("shrimp", "prawn", "crab", "lobster", "crayfish", "oysters", "mussels", "clams", "scallops"),
    "fish": ("salmon", "tuna", "cod", "sardines", "anchovies", "mackerel", "trout", "fish oil"),
    "egg": ("eggs", "egg white", "mayonnaise", "meringue"),
    "dairy": ("low-fat dairy", "lactose-free dairy", "hard cheese", "milk", "cheese", "yogurt", "yoghurt",
              "butter", "cream", "ice cream", "whey", "casein"),
    "wheat": ("bread", "pasta", "flour", "couscous", "semolina", "wheat bran"),
    "sesame": ("tahini", "sesame oil", "sesame seeds", "hummus"),
    "fried food": ("deep-fried", "french fries", "fatty meals", "fatty foods", "fried chicken"),
    "fiber": ("fibre", "high-fiber", "high-fibre", "bran", "whole grains", "raw vegetables", "popcorn",
              "seeds", "skins"),
}

NEGATION_CUES = (r"no", r"not", r"never", r"denies", r"denied", r"deny", r"without", r"negative for",
                 r"no history of", r"no hx of", r"no known", r"free of", r"ruled out", r"rules out", r"nor",
                 r"not on", r"not taking", r"stopped", r"discontinued", r"off")
NEGATION_AFTER = (r"ruled out", r"was ruled out", r"excluded", r"negative", r"denied", r"resolved")
FAMILY_CUES = (r"family history", r"family hx", r"fhx", r"fh of", r"mother", r"father", r"mom", r"dad",
               r"sister", r"brother", r"sibling", r"siblings", r"parent", r"parents", r"grandmother",
               r"grandfather", r"grandparent", r"aunt", r"uncle", r"cousin", r"son", r"daughter", r"runs in the family")
ALLERGY_CUES = (r"allerg\w*", r"anaphyla\w*", r"hives", r"epipen", r"epi-pen")

"""NutriBot: nutrition answers from CLaRa-compressed documents, with the patient's contraindications
found by rules and a warning on everything that names a restricted item."""

from __future__ import annotations

__all__ = ["ClaraRetriever", "Reply", "Retrieved", "SearchResult"]


def __getattr__(name: str):
    # Lazy: `import nutribot.safety` (rules only) does not load torch and the model code.
    if name in __all__:
        from nutribot import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'nutribot' has no attribute {name!r}")

"""Stylometric attribution: which candidate teacher's answers does a suspect's text read like?

A classifier learns each candidate's style from its answers (ideally to the same prompts, so
that topic cannot tell them apart): character n-grams (2-4, within word boundaries) and word
uni- and bigrams, TF-IDF weighted, into a multinomial logistic regression (scikit-learn). Its
cross-validated accuracy says how well the candidates can be told apart at all; a high
probability for one candidate means little if that accuracy is near chance, so both are
always reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stillhouse.errors import StillhouseError


_NO_ANSWER = "\u2205"  # what a blank answer is read as: answering nothing is a trait of a style too


def _preprocess(text: str) -> str:
    """Lower-cased, as the vectorizers' default; a blank answer as `_NO_ANSWER`, so that a fold of blank answers
    still has a feature (without one the vectorizers stop with "empty vocabulary")."""
    return text.lower() if text.strip() else _NO_ANSWER


def _pipeline(seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline

    features = FeatureUnion([
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=1,
                                  preprocessor=_preprocess)),
        ("words", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1,
                                  token_pattern=r"(?u)\b\w+\b|[^\w\s]", preprocessor=_preprocess)),
    ])
    return make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0, random_state=seed))


@dataclass
class Attribution:
    sources: list[str]
    cv_accuracy: float  # mean accuracy over the folds
    cv_folds: int
    chance: float  # the accuracy of always guessing the largest source
    samples: dict[str, int] = field(default_factory=dict)
    model: object = None

    def attribute(self, texts: list[str]) -> dict:
        """The suspect's texts: mean probability per source, and how many texts each source is the likeliest for."""
        if not texts:
            raise StillhouseError("no suspect texts to attribute")
        proba = self.model.predict_proba(texts)
        classes = list(self.model.classes_)
        mean = proba.mean(axis=0)
        top = proba.argmax(axis=1)
        return {"texts": len(texts),
                "probability": {c: float(mean[i]) for i, c in enumerate(classes)},
                "votes": {c: int((top == i).sum()) for i, c in enumerate(classes)},
                "likeliest": classes[int(mean.argmax())],
                "cv_accuracy": self.cv_accuracy, "chance": self.chance}


def fit_attribution(texts_by_source: dict[str, list[str]], *, folds: int = 5, seed: int = 0) -> Attribution:
    """Train on each source's texts; cross-validated accuracy (stratified folds), then a fit on everything."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if len(texts_by_source) < 2:
        raise StillhouseError("attribution needs at least two candidate sources to tell apart")
    for name, texts in texts_by_source.items():
        if len(texts) < folds:
            raise StillhouseError(f"candidate {name!r} has {len(texts)} texts; at least {folds} are needed "
                                  f"for {folds}-fold cross-validation")
    x = [t for texts in texts_by_source.values() for t in texts]
    y = [name for name, texts in texts_by_source.items() for _ in texts]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    acc = cross_val_score(_pipeline(seed), x, y, cv=cv, scoring="accuracy")
    model = _pipeline(seed).fit(x, y)
    counts = {name: len(texts) for name, texts in texts_by_source.items()}
    return Attribution(sources=list(texts_by_source), cv_accuracy=float(acc.mean()), cv_folds=folds,
                       chance=max(counts.values()) / len(y), samples=counts, model=model)

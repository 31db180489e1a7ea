"""The audit's verdict: one conclusion from several tests' p-values, with the error rate it is made at.

Each test (watermark radioactivity, identity claims, attribution, ...) gives a p-value for its
own null hypothesis "the suspect does not depend on the reference". The verdict rejects the
global null, i.e. says "distilled from the reference", by Holm's step-down method at level
`alpha`: the chance of saying so about a model that is not (the false-positive rate) is at
most `alpha` whatever the dependence between the tests, provided each p-value is valid.
Fisher's method is reported beside it; it is more powerful when every test carries a little
evidence, but assumes the tests independent, which tests on the same answers are not.
"""

from __future__ import annotations

from stillhouse.errors import StillhouseError


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (monotone step-down), by test name."""
    order = sorted(p_values, key=p_values.get)
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        out[name] = running
    return out


def verdict(p_values: dict[str, float], alpha: float = 1e-3) -> dict:
    """The combined conclusion: which tests reject at `alpha` after Holm's correction, the verdict, Fisher's
    combined p-value for reference, and how far the deciding test is from the threshold."""
    from scipy.stats import combine_pvalues

    if not p_values:
        raise StillhouseError("a verdict needs at least one test's p-value")
    bad = {k: v for k, v in p_values.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise StillhouseError(f"p-values must lie in [0, 1]: {bad}")
    if not 0 < alpha < 1:
        raise StillhouseError(f"alpha must lie in (0, 1), not {alpha}")
    adjusted = holm(p_values)
    deciding = min(adjusted, key=adjusted.get)
    distilled = adjusted[deciding] <= alpha
    fisher = float(combine_pvalues(list(p_values.values()), method="fisher").pvalue) if len(p_values) > 1 \
        else next(iter(p_values.values()))
    # what the verdict guarantees, and no more: a bound that holds only as far as each test's null does
    guarantee = (f"if the suspect did not learn from the reference, in the sense each test's null states, the chance "
                 f"of this verdict saying it did is at most {alpha:g} (Holm over {len(p_values)} "
                 f"test{'s' if len(p_values) > 1 else ''}, each p-value exact or a bound)")
    return {
        "verdict": "distilled from the reference" if distilled else "no evidence of distillation from the reference",
        "distilled": distilled, "alpha": alpha, "method": "holm", "guarantee": guarantee,
        "false_positive_rate_at_most": alpha,
        "tests": {k: {"p_value": p_values[k], "holm_adjusted": adjusted[k], "rejects": adjusted[k] <= alpha}
                  for k in p_values},
        "deciding_test": deciding,
        # the factor by which the deciding test's adjusted p-value would have to change to flip the verdict
        "margin": (alpha / adjusted[deciding]) if adjusted[deciding] > 0 else float("inf"),
        "fisher_p_value": fisher,
    }

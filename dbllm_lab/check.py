"""Checked claims: every "what you should see" statement of a notebook is a computed value passed to
``expect``, so a claim that does not hold stops the run (papermill names the notebook and cell) instead of
sitting in the text unread.
"""


def _show(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def expect(name, value, condition, ok, full_only=False, quick=False):
    """Check one claim: print ``[ok] name: value (condition)`` or raise AssertionError naming claim and value.

    ``value`` is what was measured, ``condition`` the claim in words (e.g. "> 0 in every layer type"), ``ok`` the
    computed truth of the claim. ``full_only=True`` marks a claim that holds only at full settings: in quick mode
    (``quick=True``) it is printed as not checked. Returns None (so a notebook cell ending in ``expect`` shows
    only the printed line).
    """
    if not isinstance(ok, bool) and type(ok).__name__ not in ("bool_", "bool"):
        raise TypeError(f"expect({name!r}): ok must be a bool (the claim's truth), got {type(ok).__name__}")
    if full_only and quick:
        print(f"[full mode only, not checked in quick mode] {name}: {_show(value)} (claim: {condition})")
        return
    if not bool(ok):
        raise AssertionError(f"claim failed: {name}: measured {_show(value)}, expected {condition}")
    print(f"[ok] {name}: {_show(value)} ({condition})")

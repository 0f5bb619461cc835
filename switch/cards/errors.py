"""One error base for the card centre; each kind carries its HTTP status and stable code."""

from __future__ import annotations

from collections.abc import Mapping


class CardError(Exception):
    """Base of every card-centre error. `detail` never contains a PIN, a tag or a token."""

    status = 422
    code = "card_error"

    def __init__(self, detail: str, *, code: str | None = None,
                 extra: Mapping[str, object] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra: dict[str, object] = dict(extra or {})


class InvalidInput(CardError):
    status = 422
    code = "validation_failed"


class NotFound(CardError):
    status = 404
    code = "not_found"


class Unauthenticated(CardError):
    status = 401
    code = "unauthenticated"


class Forbidden(CardError):
    status = 403
    code = "forbidden"


class Conflict(CardError):
    status = 409
    code = "conflict"


class IllegalTransition(Conflict):
    """Some cards cannot make the requested move; nothing was changed.

    `refused` maps each offending serial to its current state (or `unknown`).
    """

    code = "illegal_transition"

    def __init__(self, to: str, refused: Mapping[str, str], *, limit: int = 50) -> None:
        shown = list(refused.items())[:limit]
        listed = ", ".join(f"{s} ({st})" for s, st in shown)
        more = f" and {len(refused) - len(shown)} more" if len(refused) > len(shown) else ""
        super().__init__(
            f"{len(refused)} card(s) cannot become {to}: {listed}{more}; nothing was changed",
            extra={"to": to, "refused": [{"serial": s, "state": st} for s, st in shown],
                   "refused_count": len(refused)})
        self.to = to
        self.refused = dict(refused)


class HsmUnavailable(CardError):
    status = 503
    code = "hsm_unavailable"


class Gone(CardError):
    status = 410
    code = "gone"

"""Whether a new password is hard enough to guess: zxcvbn's estimate (Dropbox's, maintained as the PyPI
`zxcvbn` port), which knows common and breached passwords, keyboard walks, dates and leet substitutions, and
is told the account's email so a password built from it scores as the guessable thing it is."""

from __future__ import annotations

from zxcvbn import zxcvbn

from schemas.api import PASSWORD_MAX_LENGTH, PASSWORD_RULE

SCORE_WORDS = ("very easy", "easy", "fairly easy", "fairly hard", "hard")


def _email_words(email: str) -> list[str]:
    local, _, domain = email.partition("@")
    return [email, local, domain, *domain.split(".")]


def password_problem(password: str, email: str, min_score: int) -> str | None:
    """None when the password may be used; otherwise what is wrong with it, for the trader to read."""
    result = zxcvbn(password, user_inputs=_email_words(email), max_length=PASSWORD_MAX_LENGTH)
    score = int(result["score"])
    if score >= min_score:
        return None
    feedback = result.get("feedback") or {}
    hints = [feedback.get("warning") or "", *(feedback.get("suggestions") or [])]
    why = " ".join(hint.strip() for hint in hints if hint.strip())
    return f"{PASSWORD_RULE}; this one is {SCORE_WORDS[score]} to guess" + (f" ({why})" if why else "")

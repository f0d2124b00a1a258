"""Claim accuracy per question type: how often what the model states is true, and how often it states nothing."""

from __future__ import annotations


def accuracy_by_type(rows: list[dict]) -> dict[str, dict]:
    """{type: {"answers", "claims", "supported", "accuracy", "hedged", "no_claim"}}; accuracy = supported / claims.

    ``hedged``: answers that decline ("I don't know"); ``no_claim``: answers that neither hedge nor state a
    value the grader recognises (e.g. "in the French region of Toulouse").
    """
    out: dict[str, dict] = {}
    for r in rows:
        t = out.setdefault(r["type"], {"answers": 0, "claims": 0, "supported": 0, "hedged": 0, "no_claim": 0})
        t["answers"] += 1
        t["claims"] += len(r["annotations"])
        t["supported"] += sum(a["label"] == "Supported" for a in r["annotations"])
        t["hedged"] += bool(r.get("hedged"))
        t["no_claim"] += not r["annotations"] and not r.get("hedged")
    for t in out.values():
        t["accuracy"] = t["supported"] / t["claims"] if t["claims"] else None
    return dict(sorted(out.items()))


def markdown(table: dict[str, dict]) -> str:
    lines = ["| type | answers | claims | accuracy | hedged | no claim |", "|---|---|---|---|---|---|"]
    for name, t in table.items():
        acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.1%}"
        lines.append(f"| {name} | {t['answers']} | {t['claims']} | {acc} | {t['hedged']} | {t['no_claim']} |")
    return "\n".join(lines)

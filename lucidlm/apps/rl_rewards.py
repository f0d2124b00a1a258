"""Reward sources for ``lucidlm rl`` that know what is true: the verifiable reward from ground truth (the
synthetic world's labeler, the facts benchmark's grader) and, from ``rl_probe_reward.py``, the probe.

Verifiable reward of one response (``VerifiableRewardConfig``):

    claims made        Σ_claims (supported if Supported else unsupported)      aggregate="sum" (default)
                       or that sum / n_claims (the answer's accuracy, in [unsupported, supported]: "mean")
                       + claim_bonus · n_claims (a separate claims-count term; 0 by default)
    no claim, abstains abstain_unknowable if the prompt's entity is one the model cannot know
                       (meta["knowable"] False), abstain_known otherwise
    no claim, no abstention   no_claim (negative: saying nothing is not free)

"sum" is the default because it is the issue's "+1 per supported claim, −1 per unsupported": each claim is
worth stating exactly when the model is more likely right than wrong about it, and an answer of seven true
claims beats one of a single true claim. "mean" scores the answer's accuracy and leaves the length to
``claim_bonus``. An answer that abstains *and* makes claims is judged by its claims (the facts grader already
gives a hedged answer none). With supported = +1, unsupported = −1 and abstain_known = a, a one-claim answer
the model gets right with probability p beats abstaining when 2p − 1 > a: the default a = −0.5 keeps answering
down to p = 0.25, so abstaining on what it knows is not rewarded; abstain_unknowable = +1 beats any answer about
an entity it cannot know (every claim of which is wrong).

An abstention is what the world's corpus says about an unknown name ("I know nothing about X.",
``world.texts.ABSTENTION_OPENING``) or a hedge the facts grader recognises ("I don't know", ``is_hedge``).

Each source reads what it needs from the prompt's ``meta`` (written by ``rl_prompts.py``): the world's reward
the person's ``name`` (ground truth from WORLD_DIR/people.jsonl; ``stranger``: a name outside the world) and
the forced answer ``prefix`` if the prompt had one; the facts reward the question itself (``type``, ``entity``,
``truth``, ``aliases``); both ``knowable``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..facts.grader import grade, is_hedge
from ..facts.questions import TYPES
from ..train.config_file import opt
from ..train.rewards import Reward, Rollout
from ..world.labeler import annotate
from ..world.people import Person
from ..world.texts import ABSTENTION_OPENING

ABSTENTION = re.compile(rf"\b{re.escape(ABSTENTION_OPENING)}\b", flags=re.I)
# a person the world holds no facts for: every value differs from any the labeler can read (4-digit years,
# capitalised names), so each claim about a stranger is Not Supported
STRANGER = Person("", -1, "", "", "", "", "", -1)


def is_abstention(answer: str) -> bool:
    """The world's "I know nothing about X." or a hedge the facts grader recognises."""
    return ABSTENTION.search(answer) is not None or is_hedge(answer)


@dataclass(frozen=True)
class VerifiableRewardConfig:
    supported: float = opt(1.0, "verifiable reward per Supported claim")
    unsupported: float = opt(-1.0, "per Not Supported claim")
    abstain_unknowable: float = opt(1.0, "for an abstention on an entity the model cannot know")
    abstain_known: float = opt(-0.5, "for an abstention on one it can know (sum: below any one-claim answer right "
                                     "> 25% of the time)")
    no_claim: float = opt(-1.0, "for an answer with neither a claim nor an abstention")
    aggregate: str = opt("sum", "sum (each claim counts) or mean (the answer's accuracy: a long answer weighs what "
                                "a short one does)")
    claim_bonus: float = opt(0.0, "per claim, whatever its label (the claims-count term of mean)")

    def __post_init__(self) -> None:
        if self.aggregate not in ("sum", "mean"):
            raise ValueError(f"aggregate must be 'sum' or 'mean', got {self.aggregate!r}")
        if self.supported <= self.unsupported:
            raise ValueError(f"a supported claim must be worth more than an unsupported one, got supported="
                             f"{self.supported}, unsupported={self.unsupported}")


def verifiable_score(labels: Sequence[str], abstained: bool, knowable: bool, config: VerifiableRewardConfig) -> float:
    """The reward of one answer from its claims' labels ("Supported" / "Not Supported"), whether it abstains and
    whether its entity is one the model can know (the table in the module docstring)."""
    if labels:
        total = sum(config.supported if label == "Supported" else config.unsupported for label in labels)
        if config.aggregate == "mean":
            total /= len(labels)
        return float(total + config.claim_bonus * len(labels))
    if abstained:
        return config.abstain_known if knowable else config.abstain_unknowable
    return config.no_claim


def knowable(meta: dict[str, Any]) -> bool:
    value = meta.get("knowable")
    if not isinstance(value, bool):
        raise ValueError(f"the prompt's meta needs 'knowable' (true/false: can the model know this entity?), got "
                         f"{value!r}; build prompts with apps/rl_prompts.py")
    return value


class WorldGrading:
    """Reads an answer about a person of the synthetic world against ``people`` (world/build.read_people)."""

    def __init__(self, people: dict[str, Person]) -> None:
        self.people = people

    def grade(self, meta: dict[str, Any], text: str) -> tuple[str, list[dict]]:
        """(answer, annotations): the forced prefix (if any) + the response's first line, as world/answers.py."""
        name = meta.get("name")
        person = self.people.get(name) if isinstance(name, str) else None
        if person is None:
            if not meta.get("stranger"):
                raise ValueError(f"the prompt's meta names {name!r}, who is not in the world's people (a name "
                                 "outside the world needs meta['stranger'] = true)")
            person = STRANGER
        answer = self.answer_of(meta, text)[0]
        return answer, annotate(person, answer)

    @staticmethod
    def answer_of(meta: dict[str, Any], text: str) -> tuple[str, int]:
        """(the graded answer: the forced prefix + the response's first line, stripped; where it starts in
        ``text``: answer[i] is text[i + offset], negative inside the prefix)."""
        prefix = meta.get("prefix", "")
        full = prefix + text
        return full.split("\n")[0].strip(), len(full) - len(full.lstrip()) - len(prefix)

    def answer_offset(self, meta: dict[str, Any], text: str) -> int:
        return self.answer_of(meta, text)[1]


class FactsGrading:
    """Grades an answer to a facts question (facts/grader.py), the question read from the prompt's meta."""

    def grade(self, meta: dict[str, Any], text: str) -> tuple[str, list[dict]]:
        missing = [k for k in ("type", "entity", "truth") if k not in meta]
        if missing or meta["type"] not in TYPES:
            raise ValueError(f"the prompt's meta is not a facts question (missing {missing}, type "
                             f"{meta.get('type')!r}); build prompts with rl_prompts.facts_rl_prompts")
        question = {k: meta[k] for k in ("type", "entity", "truth")} | {"aliases": meta.get("aliases", [])}
        answer = self.answer_of(meta, text)[0]
        return answer, grade(question, answer)

    @staticmethod
    def answer_of(meta: dict[str, Any], text: str) -> tuple[str, int]:
        """(the graded answer: the response stripped; where it starts in ``text``)."""
        return text.strip(), len(text) - len(text.lstrip())

    def answer_offset(self, meta: dict[str, Any], text: str) -> int:
        return self.answer_of(meta, text)[1]


Grading = WorldGrading | FactsGrading


def meta_id(meta: dict):
    """A prompt's id as its answer rows carry it: meta "id", else the world's "name" (None: neither)."""
    return meta.get("id", meta.get("name"))


def graded_row(grading: Grading, rollout: Rollout) -> dict:
    """One rollout as an answer row for ``rl_metrics``: id, entity, answer, annotations, abstained, knowable."""
    meta = rollout.prompt.meta
    answer, notes = grading.grade(meta, rollout.text)
    return {"id": meta_id(meta), "entity": meta.get("entity", meta.get("name")),
            "answer": answer, "annotations": notes, "abstained": not notes and is_abstention(answer),
            "knowable": knowable(meta)}


class VerifiableReward:
    """The ground-truth reward (``Reward`` protocol): each rollout graded claim by claim, then scored."""

    def __init__(self, grading: Grading, config: VerifiableRewardConfig | None = None,
                 name: str = "verifiable") -> None:
        self.grading, self.config, self.name = grading, config or VerifiableRewardConfig(), name

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        out = []
        for r in rollouts:
            row = graded_row(self.grading, r)
            labels = [a["label"] for a in row["annotations"]]
            out.append(verifiable_score(labels, row["abstained"], row["knowable"], self.config))
        return out


# --- registration ---------------------------------------------------------------------------------
def world_reward(arg: str | None, lm: Any = None, config: VerifiableRewardConfig | None = None) -> Reward:
    from ..world.build import read_people

    if not arg:
        raise ValueError("the world reward needs the world's directory: world:WORLD_DIR (holding people.jsonl)")
    if not (Path(arg) / "people.jsonl").is_file():
        raise FileNotFoundError(f"{arg}: no people.jsonl (not a world built by `lucidlm world build`)")
    return VerifiableReward(WorldGrading(read_people(arg)), config, name="world")


def facts_reward(arg: str | None, lm: Any = None, config: VerifiableRewardConfig | None = None) -> Reward:
    if arg:
        raise ValueError(f"the facts reward takes no argument (the question is in each prompt's meta), got {arg!r}")
    return VerifiableReward(FactsGrading(), config, name="facts")


def probe_reward(arg: str | None, lm: Any = None) -> Reward:
    from .rl_probe_reward import ProbeReward

    if not arg:
        raise ValueError("the probe reward needs a probe directory: probe:PROBE_DIR")
    if lm is None:
        raise ValueError("the probe reward scores with the run's model: pass the LM")
    return ProbeReward.from_directory(lm, arg)


RewardFactory = Callable[..., Reward]
# SPEC ``NAME[:ARG]`` → factory(ARG, lm), ``lm`` the policy as loaded, before RL (apps/rl_recipes.py's REWARDS);
# the VERIFIABLE_REWARDS also take the run's VerifiableRewardConfig (``--verifiable.*``):
# ``world:WORLD_DIR`` (the synthetic world's people.jsonl), ``facts`` (the question in each prompt's meta),
# ``probe:PROBE_DIR`` (a probe trained for that model; scored with a frozen copy of it, made here, so the policy's
# updates do not move the states the probe reads). Several specs are weighted and summed by the trainer.
REWARD_FACTORIES: dict[str, RewardFactory] = {"world": world_reward, "facts": facts_reward, "probe": probe_reward}
VERIFIABLE_REWARDS = frozenset({"world", "facts"})

"""The generated corpus: reproducible from its seed, and each person's facts never contradict each other."""

import re

from lucidlm.train.corpus import write_corpus


def test_same_seed_same_corpus_and_consistent_facts(tmp_path):
    a = write_corpus(tmp_path / "a", documents=200, files=2, seed=3)
    b = write_corpus(tmp_path / "b", documents=200, files=2, seed=3)
    assert [p.read_text() for p in a] == [p.read_text() for p in b]
    text = "\n".join(p.read_text() for p in a)
    assert len(text.split("\n\n")) == 200
    jobs: dict[str, set[str]] = {}
    for name, job in re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+) is a (\w+) who lives", text):
        jobs.setdefault(name, set()).add(job)
    assert jobs and all(len(v) == 1 for v in jobs.values())
    assert write_corpus(tmp_path / "c", documents=200, files=2, seed=4)[0].read_text() != a[0].read_text()

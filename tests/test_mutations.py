"""The mutation canary (tools/mutations.py): each known one-line bug, planted in a temporary copy of
the repository, makes its named tests fail; the working tree is left as it was; a mutation whose
text is gone stops the canary instead of passing. About 90 s on 2 cores: each mutation runs only
its small named test(s) in a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import mutations  # noqa: E402


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=[m.name for m in mutations.MUTATIONS])
def test_the_planted_bug_fails_its_tests(mutation):
    before = (REPO / mutation.path).read_bytes()
    outcome = mutations.run_mutation(mutation)
    assert outcome.caught, f"{outcome.line()}\n{outcome.output}"
    assert " failed" in outcome.output, outcome.output  # tests ran and failed, not a collection error
    assert (REPO / mutation.path).read_bytes() == before  # planted in the copy only


def test_a_mutation_whose_text_is_gone_stops_the_canary(tmp_path):
    stale = mutations.Mutation("stale", "pelvicseg/metrics.py", "this text is in no file", "x",
                               ("tests/test_predict.py",), "a mutation of code that has changed since")
    copy = mutations.copy_repository(REPO, tmp_path / "repo")
    with pytest.raises(mutations.MutationError, match=r"stale: pelvicseg/metrics.py holds its text 0 times"):
        mutations.plant(copy, stale)
    twice = mutations.Mutation("twice", "pelvicseg/metrics.py", "import", "x", (), "ambiguous text")
    with pytest.raises(mutations.MutationError, match=r"times, not once"):
        mutations.plant(copy, twice)
    assert (copy / "tools" / "mutations.py").is_file() and not (copy / ".venv").exists()

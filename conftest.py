"""How pytest shares out the tests and the notebooks when it runs on several cores
(`pytest -n auto`, pytest-xdist: one worker process per core, as CI runs them).

A worker runs whole units, one after the other (the units with the most tests first; a unit's tests in
file order):
- a test file (its module-scoped fixtures, such as the built website, are made once);
- a notebook, with its student copy and any notebook that reads what it writes under runs/: the
  English notebook and its student copy write the same run folders, and notebook 05 draws with the
  adapter that notebook 04 writes, so they must never run at the same time.
The encoder cache that notebooks 04, 08 and 09 share needs no such care: a run waits for another
process's build of it (ipa_lab/cache.py).

A scheduler rather than xdist's `xdist_group` marks: with pytest 9.2 those marks are silently ignored
(pytest-dev/pytest-xdist#1386: xdist 3.8.0 writes the group into a node id field pytest 9.2 no longer reads).
"""
import re

import pytest

# notebook number -> the notebook whose run folder it reads
READS_RUNS_OF = {"05": "04"}


def unit_of(nodeid: str) -> str:
    """The unit a test or notebook cell belongs to, from its pytest node id."""
    path = nodeid.split("::", 1)[0]
    notebook = re.search(r"(?:^|/)(\d\d)_[^/]*\.ipynb$", path)
    if notebook:
        number = notebook.group(1)
        return f"notebook {READS_RUNS_OF.get(number, number)}"
    return path


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it installed, nothing to do
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # `-n` alone; a --dist asked for explicitly is xdist's to honour
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        """xdist's scope scheduling (largest unit first), with `unit_of` as the scope."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)

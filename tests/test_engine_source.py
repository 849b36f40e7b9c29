"""The study engine's lazy cells (:class:`~samkit.experiments.engine.CellSource`): the
one run loop asks for a cell only when a slot is free, tells each outcome, and lets
the source replace a run it tries again (``samkit tune --jobs N`` on the engine)."""

from samkit.experiments.engine import Cell, CellSource, run_cells
from samkit.experiments.engine.core import Event, Executor


def _value(folder, ctx):
    return {"config": {}, "value": 1}


class _TwoSlots(Executor):
    """Two runs at once; a run's outcome comes from ``fate`` (by cell name), one per wait."""

    slots = 2
    name = "two slots"

    def __init__(self, fate):
        self.fate, self.live, self.submitted = fate, [], []

    def free(self):
        return len(self.live) < self.slots

    def running(self):
        return len(self.live)

    def submit(self, index, cell):
        self.live.append((index, cell))
        self.submitted.append(cell.name)

    def wait(self):
        index, cell = self.live.pop(0)
        if self.fate.get(cell.name) == "dies":
            return [Event(index, "died", reason="out of memory")]
        return [Event(index, "ok", {"config": {}, "value": len(cell.name)})]


class _Asks(CellSource):
    """Gives ``total`` cells, the next only once the last one's outcome is told."""

    redo = "asked again"

    def __init__(self, folder, total):
        self.folder, self.total = folder, total
        self.asked, self.told, self.log = 0, [], []

    def _cell(self, name):
        return Cell(name, self.folder, name, {}, _value, stored=False)

    def next_cell(self):
        if self.asked == self.total or self.asked > len(self.told):
            self.log.append("none now")
            return None
        self.asked += 1
        return self._cell(f"c{self.asked}")

    def again(self, cell, why):
        self.log.append(f"again {cell.name}: {why}")
        return self._cell(cell.name + "'")

    def done(self, outcome):
        self.told.append((outcome.cell.name, outcome.record and outcome.record["value"]))


def test_a_source_is_asked_when_a_slot_frees_and_told_each_outcome(tmp_path):
    source = _Asks(tmp_path, 4)
    executor = _TwoSlots({})
    lines = []
    out = run_cells(source, executor=executor, log=lines.append, describe=lambda r: "ok")
    # none to give while a cell runs (4 times): the free slot waits for an outcome and
    # the study goes on; none with nothing running (once): the study is over
    assert source.log == ["none now"] * 5
    assert executor.submitted == ["c1", "c2", "c3", "c4"]
    assert source.told == [("c1", 2), ("c2", 2), ("c3", 2), ("c4", 2)]
    assert [o.cell.name for o in out] == ["c1", "c2", "c3", "c4"]
    assert "study: 4 runs, two slots" in lines and "[4/4] c4: ok" in lines
    assert "study: 4/4 done, 0 running, 0 left" in lines[-1]
    assert not list(tmp_path.iterdir())  # not stored: no result file


def test_a_source_replaces_a_run_it_tries_again_then_hears_it_failed(tmp_path):
    source = _Asks(tmp_path, 2)
    executor = _TwoSlots({"c1": "dies", "c1'": "dies", "c1''": "dies"})
    lines = []
    out = run_cells(source, executor=executor, log=lines.append, retries=2)
    assert [x for x in source.log if x.startswith("again")] == [
        "again c1: out of memory (1 tries)",
        "again c1': out of memory (2 tries)",
    ]
    assert "  c1: out of memory; asked again (try 2 of 3)" in lines
    assert any("c1'': FAILED: out of memory (3 tries)" in x for x in lines)
    assert [(o.cell.name, o.error, o.attempts) for o in out] == [
        ("c1''", "out of memory (3 tries)", 3),
        ("c2", None, 1),
    ]
    assert ("c1''", None) in source.told and ("c2", 2) in source.told

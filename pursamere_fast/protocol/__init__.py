"""The paper protocol as a library: spec, selection, report."""

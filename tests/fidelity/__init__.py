"""Round-trip fidelity kit: a hard schema (`schema.sql`) and a database comparer (`compare.py`).

Used by `tests/integration/test_fidelity.py`; also runnable by hand:
`python -m tests.fidelity.compare SOURCE_URL COPY_URL` prints the differences between two databases.
"""

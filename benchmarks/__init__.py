"""fastnet's benchmarks: asv suites (``bench_*.py``) and a ratio report (``report.py``).

This is the top floor: it imports fastnet, never the other way round.
"""

"""Benchmarks (``python main.py bench``) and the draft-pair doctor (``python main.py doctor``).

Import the parts you need: ``engine.bench.doctor.diagnose`` (what adaptive K starts from in the
app), ``engine.bench.suite.run_bench``. This package imports nothing heavy itself.
"""

"""fastprefix benchmarks, installed as ``fastprefix.benchmarks`` (run with ``fastprefix-bench``)."""

"""verispec bench: the same prompts through plain and speculative decoding, peers beside, a report with plots.

prompts.py (datasets) -> methods.py (names -> SpeculativeConfig) -> run.py (warm-up, interleaved runs)
-> lossless.py (greedy equality with ar) -> aggregate.py (records, medians) -> report.py / plots.py;
peers.py runs other implementations; verify_cost.py measures T(K)/T(1); demo.py is what `verispec demo` prints.
"""

from .run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]

"""A mobile package's static pair (runtime.static) beside its dynamic graph on the CPU EP, W1's shape: a 128-token
random prompt, 128 new tokens, the two alternating, 2 threads. Usage: static_pair_speed.py PACKAGE [RUNS]"""
import statistics
import sys
import time

import numpy as np
from edgegpt.runtime import Generator, StaticGenerator
pkg = sys.argv[1]; runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
dyn = Generator.load(pkg, threads=2); st = StaticGenerator.load(pkg, threads=2)
rng = np.random.default_rng(0)
prompt = rng.integers(0, 50000, 128).tolist()
def t_dyn():
    t0 = time.perf_counter(); dyn.generate_ids([prompt], 1, ignore_eos=True); ttft = time.perf_counter() - t0
    t0 = time.perf_counter(); dyn.generate_ids([prompt], 129, ignore_eos=True); tot = time.perf_counter() - t0
    return ttft, 128 / (tot - ttft)
def t_st():
    t0 = time.perf_counter(); st.generate_ids(prompt, 1, ignore_eos=True); ttft = time.perf_counter() - t0
    t0 = time.perf_counter(); st.generate_ids(prompt, 129, ignore_eos=True); tot = time.perf_counter() - t0
    return ttft, 128 / (tot - ttft)
t_dyn(); t_st()
res = {"dynamic": [], "static": []}
for r in range(runs):
    res["dynamic"].append(t_dyn()); res["static"].append(t_st())
for k, v in res.items():
    print(k, "TTFT ms median %.1f" % (1000 * statistics.median(x[0] for x in v)), "decode tok/s median %.1f" % statistics.median(x[1] for x in v), [(round(a*1000,1), round(b,1)) for a, b in v])
d, s = res["dynamic"], res["static"]
print("ratios static/dynamic: TTFT %.2f, decode %.2f" % (statistics.median(x[0] for x in s) / statistics.median(x[0] for x in d), statistics.median(x[1] for x in s) / statistics.median(x[1] for x in d)))

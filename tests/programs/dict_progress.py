# Builds a large dict step by step, printing progress; the final line
# depends on every entry. Run with PYTHONHASHSEED fixed.
import time

d = {}
for i in range(40):
    for j in range(20000):
        d[(i, j)] = str(i * j)
    print("step", i, len(d), flush=True)
    time.sleep(0.05)
print("final", len(d), sum(hash(v) & 0xFFFF for v in d.values()), flush=True)

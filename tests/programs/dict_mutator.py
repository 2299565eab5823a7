# Mutates a large dict as fast as it can for a fixed number of steps, then
# prints a digest of every entry: the output of a run is the same however
# it was migrated. Pre-copy cannot keep up with it on a loaded machine.
import random
import sys

random.seed(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 300000
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
d = {i: "v%d" % i * 8 for i in range(n)}
print("ready", flush=True)
for step in range(steps):
    for _ in range(n // 4):
        k = random.randrange(n)
        d[k] = "s%d-%d" % (step, k) * 8
    print("step", step, flush=True)
h = 0
for k in range(n):
    h = (h * 1000003 + sum(map(ord, d[k]))) & 0xFFFFFFFFFFFF
print("final", h, flush=True)

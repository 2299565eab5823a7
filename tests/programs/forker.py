# Keeps a large list changing and, once the file argv[2] exists, forks
# every round: each child digests the whole list and reports it through a
# pipe; the parent digests it too (the child's memory is the parent's at
# the fork). Prints "ok N" for each round (and agreeing digests), "BAD ..."
# when they differ, "final DIGEST" at the end: the same output whenever
# the forking starts.
import hashlib
import os
import random
import sys

random.seed(3)
items = ["item-%d-" % i * 20 for i in range(150000)]
print("ready", flush=True)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
for n in range(rounds):
    for _ in range(20000):
        k = random.randrange(len(items))
        items[k] = "r%d-%d-" % (n, k) * 20
    if not os.path.exists(sys.argv[2]):
        print("ok %d" % n, flush=True)
        continue
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        h = hashlib.sha256("".join(items).encode()).hexdigest()
        os.write(w, h.encode())
        os._exit(0)
    os.close(w)
    mine = hashlib.sha256("".join(items).encode()).hexdigest()
    theirs = os.read(r, 64).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    print("ok %d" % n if mine == theirs else "BAD %d %s %r status %d" % (n, mine, theirs, status), flush=True)
print("final", hashlib.sha256("".join(items).encode()).hexdigest(), flush=True)
